# idle.S - the idle migration test guest: one 512-byte x86 boot sector.
#
# Enters 32-bit protected mode the way ab.S does, says 'A' on COM1 and
# halts for good.  It writes no memory after boot, so every pass of a
# migration after the first finds nothing dirty: the baseline against which
# the a-b guest's dirtying is measured.
#
# Build: as --32 idle.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary.

        .set    COM1, 0x3f8

        .code16
        .globl  _start
_start:
        cli                             # no IDT in protected mode: no interrupts ever
        ljmp    $0, $real               # pin CS:IP to 0:7c00 whatever the BIOS used
real:
        xor     %ax, %ax
        mov     %ax, %ds
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

        mov     $'A', %al
        mov     $COM1, %dx
        out     %al, %dx

        # Interrupts are off: only an SMI resumes after HLT, so halt again.
1:      hlt
        jmp     1b

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      # 0x08: code, 32-bit, base 0, limit 4 GiB
        .quad   0x00cf92000000ffff      # 0x10: data, base 0, limit 4 GiB
gdtr:
        .word   gdtr - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa              # BIOS boot signature
