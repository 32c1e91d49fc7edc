# ab64.S - the "a-b" incrementer for the emulated platform's x86-64 vCPUs.
#
# The same guest as ab.S (QEMU's migration-test idea) without the boot:
# vmmig.guests.emu.load_program has already set up long mode (identity-mapped
# paging, flat segments, RSP) and written the region into the block at 0x500,
# whose layout is ab.S's, so vmmig.guests.ab_check checks both guests:
#
#   0x500  u32  start of the region (host), always 0x00100000
#   0x504  u32  end of the region, exclusive, page aligned (host)
#   0x508  u32  complete passes so far (guest; wraps at 2^32)
#   0x50c  u32  passes to make before halting, 0 for ever (host)
#
# It prints 'A' on COM1, zeroes byte 0 of every 4 KiB page of the region,
# then increments them page after page forever, printing 'B' after each
# pass.  At any instant byte 0 of the pages reads X+1 ... X+1, X ... X:
# at most one "edge", where the incrementer is.  The guest checks the rule
# itself too: before it increments a page's byte, the byte must hold the
# passes completed so far (mod 256); if not, it prints 'X' and halts.  So a
# host that cannot read the guest's memory (SEV) still learns, from the
# console, that a full pass after a migration found every page as it
# should be.
#
# Position-independent: it may be loaded anywhere below 1 MiB.

        .set    COM1, 0x3f8
        .set    INFO, 0x500
        .set    PAGE, 0x1000

        .code64
        .text
        .globl  _start
_start:
        mov     INFO, %r8d              # %r8 = start (a 32-bit load zero-extends)
        mov     INFO + 4, %r9d          # %r9 = end
        movl    $0, INFO + 8

        mov     $'A', %al
        call    putc

        # One zeroing pass, so the rule holds whatever RAM held.
        mov     %r8, %rdi
1:      movb    $0, (%rdi)
        add     $PAGE, %rdi
        cmp     %r9, %rdi
        jb      1b

        # Dirty forever, one byte per page, in address order.
pass:
        mov     %r8, %rdi
        mov     INFO + 8, %r10d         # %r10b: what every byte holds before this pass
2:      cmpb    %r10b, (%rdi)
        jne     broken
        incb    (%rdi)
        add     $PAGE, %rdi
        cmp     %r9, %rdi
        jb      2b
        incl    INFO + 8
        mov     INFO + 12, %eax         # a pass limit: the "fill" workload
        test    %eax, %eax
        jz      3f
        cmp     %eax, INFO + 8
        jae     rest
3:      mov     $'B', %al
        call    putc
        jmp     pass

broken: mov     $'X', %al
        call    putc
rest:   hlt
        jmp     rest

# Write %al to COM1 (the host's on_port_write sees port 0x3f8).
putc:
        mov     $COM1, %dx
        out     %al, %dx
        ret
