# ab.S - the "a-b" migration test guest: one 512-byte x86 boot sector.
#
# Modelled on QEMU's tests/migration/i386/a-b-bootblock.S.  It dirties
# guest RAM without pause, so a migration has to chase it, and it leaves
# memory in a shape the host can verify (vmmig.guests.ab_check):
#
#   1. real mode -> 32-bit protected mode, flat segments;
#   2. paging and 64-bit long mode: identity map of 0..4 GiB, 2 MiB pages;
#   3. end of RAM below 4 GiB read from CMOS;
#   4. the bounds of the dirtied region stored at 0x500 (layout below);
#   5. 'A' on COM1;
#   6. byte 0 of every 4 KiB page in [1 MiB, end) zeroed, then, forever,
#      incremented page after page; 'B' on COM1 every 64 complete passes.
#
# Built with --defsym PASSES=N it halts after N passes instead: the "fill"
# guest (PASSES=1) has written every page of its memory once, then rests.
#
# So at any instant byte 0 of the pages reads X+1 ... X+1, X ... X: at most
# one "edge", where the incrementer is.
#
# Why paging, and why 64-bit: a paravirtual nested KVM (kvm_pvm) runs a vCPU
# on the hardware only once it is in 64-bit mode with paging on, and emulates
# it instruction by instruction before that; 32-bit paging does not qualify
# (and its emulation there triple-faults).  Measured on such a host, this
# guest nevertheless stays emulated (the host never converts it, for reasons
# not known): about 16 passes/s over 64 MiB and 0.8
# over 1 GiB, where 32-bit code without paging makes 21 and 0.9.  Under TCG
# it makes about 450 and 20.
#
# Well-known block at physical 0x500 (little-endian u32s, below 1 MiB so
# never dirtied by the loop itself):
#   0x500  start of the dirtied region, always 0x00100000
#   0x504  end of the dirtied region (exclusive, page aligned) = end of RAM
#   0x508  complete passes so far (wraps at 2^32)
#   0x50c  reserved, 0
#
# Low memory also holds the page tables, 0x1000..0x6fff.
#
# Build: as --32 ab.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary.

        .ifndef PASSES
        .set    PASSES, 0               # passes before halting; 0: never halt
        .endif
        .set    COM1, 0x3f8
        .set    INFO, 0x500             # the well-known block above
        .set    PML4, 0x1000            # page tables: PML4, one PDPT, four PDs
        .set    PDPT, 0x2000
        .set    PD, 0x3000
        .set    REGION_START, 0x100000  # 1 MiB: leaves the BIOS area, IVT, us alone
        .set    PAGE, 0x1000

        .code16
        .globl  _start
_start:
        cli                             # no IDT anywhere: no interrupts ever
        ljmp    $0, $real               # pin CS:IP to 0:7c00 whatever the BIOS used
real:
        xor     %ax, %ax
        mov     %ax, %ds

        # A20 on (fast A20 gate) or every odd MiB would alias the even one.
        in      $0x92, %al
        or      $2, %al
        out     %al, $0x92

        # Phase 1: protected mode with flat segments.
        lgdtl   gdtr
        mov     %cr0, %eax
        or      $1, %al                 # CR0.PE
        mov     %eax, %cr0
        ljmpl   $0x08, $prot

        .code32
prot:
        mov     $0x10, %eax
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %ss

        # Phase 2: identity map 0..4 GiB.  PML4[0] -> PDPT; PDPT[0..3] ->
        # four consecutive page directories, whose 2048 entries each map
        # 2 MiB (present, writable, PS) at i << 21.  Entries are 8 bytes; the
        # high halves are zero, from clearing the tables first.
        cld
        mov     $PML4, %edi
        xor     %eax, %eax
        mov     $(PD + 4 * PAGE - PML4) / 4, %ecx
        rep stosl
        movl    $PDPT + 3, PML4
        mov     $PDPT, %edi
        mov     $PD + 3, %eax
        mov     $4, %ecx
1:      stosl
        scasl                           # skip the high half: %edi += 4
        add     $PAGE, %eax
        loop    1b
        mov     $PD, %edi
        mov     $0x83, %eax
        mov     $2048, %ecx
2:      stosl
        scasl
        add     $0x200000, %eax
        loop    2b

        # Long mode: CR4.PAE, CR3, EFER.LME, then CR0.PG activates it.
        mov     %cr4, %eax
        or      $0x20, %eax
        mov     %eax, %cr4
        mov     $PML4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000000, %eax
        mov     %eax, %cr0
        ljmp    $0x18, $long

        .code64
long:
        mov     $0x7c00, %esp           # stack just below us, for call/ret

        # Phase 3: end of RAM below 4 GiB.  CMOS 0x34/0x35 count the RAM
        # above 16 MiB in 64 KiB units (QEMU stops them at the PCI hole);
        # when they are 0, RAM ends below 16 MiB and 0x30/0x31 count the KiB
        # above 1 MiB instead.
        mov     $0x35, %al
        call    cmos
        mov     $0x34, %al
        call    cmos
        movzwl  %bx, %esi
        shl     $16, %esi
        add     $0x1000000, %esi
        test    %bx, %bx
        jnz     3f
        mov     $0x31, %al
        call    cmos
        mov     $0x30, %al
        call    cmos
        movzwl  %bx, %esi
        shl     $10, %esi
        add     $REGION_START, %esi
        and     $~(PAGE - 1), %esi
3:                                      # %esi = end of the region from now on

        # Phase 4: publish the region for the host.
        movl    $REGION_START, INFO
        mov     %esi, INFO + 4
        xor     %eax, %eax
        mov     %eax, INFO + 8
        mov     %eax, INFO + 12

        mov     $'A', %al
        call    putc

        # Phase 5: one zeroing pass, so the rule holds whatever RAM held.
        mov     $REGION_START, %edi
4:      movb    $0, (%rdi)
        add     $PAGE, %edi
        cmp     %esi, %edi
        jb      4b

        # Phase 6: dirty forever, one byte per page, in address order.
pass:
        mov     $REGION_START, %edi
5:      incb    (%rdi)
        add     $PAGE, %edi
        cmp     %esi, %edi
        jb      5b
        incl    INFO + 8
        .if     PASSES
        cmpl    $PASSES, INFO + 8
        jae     rest
        .endif
        testb   $63, INFO + 8
        jnz     pass
        mov     $'B', %al
        call    putc
        jmp     pass

        .if     PASSES
rest:   hlt                             # interrupts are off: only an SMI wakes it
        jmp     rest
        .endif

# Shift CMOS register %al into %bx from the right: %bx = %bx << 8 | value.
cmos:
        out     %al, $0x70
        shl     $8, %bx
        in      $0x71, %al
        mov     %al, %bl
        ret

# Write %al to COM1; QEMU's UART takes it without any set-up.
putc:
        mov     $COM1, %dx
        out     %al, %dx
        ret

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      # 0x08: code, 32-bit, base 0, limit 4 GiB
        .quad   0x00cf92000000ffff      # 0x10: data, base 0, limit 4 GiB
        .quad   0x00af9a000000ffff      # 0x18: code, 64-bit
gdtr:
        .word   gdtr - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa              # BIOS boot signature
