# regs.S - the register-torture program: its running state breaks detectably
# if any register is lost or altered across a pause or a migration.
#
# State: 14 GPRs (RAX RBX RCX RDX RSI RDI RBP R8-R14), XMM0-15 and the
# iteration number in R15.  Each iteration mixes them all with one recurrence
# (vmmig.guests.emu.regs_check.step is its Python twin, and the two must
# change together):
#
#   g0 += i                              (no all-zero fixed point)
#   for k in 0..13, p = g[k-1] (g[-1] = g13):
#     k even:  g[k] = rol(g[k] ^ p, ROT[k])
#     k odd:   g[k] = (g[k] + p) * MUL[k]          (odd multipliers: invertible)
#   for j in 0..15, p = x[j-1] (x[-1] = x15), lane-wise on the two u64 halves:
#     j even:  x[j] = swap_halves(x[j] + p)
#     j odd:   x[j] = swap_halves(x[j] ^ p)
#   x0 += (g12, g13);  g0 += x15.low;  g1 ^= x15.high   (through memory at 0x780)
#   i += 1
#
# Every INTERVAL iterations (and once at the start) it appends a checkpoint
# to a ring: the iteration number, the full register state, and a hash that
# chains the entry to the one before.  The host (regs_check.check_regs_chain)
# recomputes each checkpoint from the one before: a register changed between
# two checkpoints breaks that link, whatever the register.
#
# Block at 0x700 (u64s):
#   0x700  ring_start  (host)  first entry, 512-byte aligned
#   0x708  ring_end    (host)  end of the ring, exclusive, whole entries
#   0x710  interval    (guest) iterations between checkpoints
#   0x718  count       (guest) checkpoints written so far
#   0x720  next        (guest) address of the entry written next
#   0x728  last_hash   (guest) hash of the newest entry
#   0x780  16 bytes    (guest) scratch of the GPR <-> XMM exchange
#
# Entry (512 bytes):
#   0x000  u64       iteration number (R15)
#   0x008  u64       hash of the previous entry (0 before the first)
#   0x010  u64       hash of this entry: h = previous; for each u64 w of the
#                    iteration, GPRs and XMMs in order: h ^= w,
#                    h *= HASH_MUL (mod 2^64), h ^= h >> 29
#   0x020  14 x u64  RAX RBX RCX RDX RSI RDI RBP R8 R9 R10 R11 R12 R13 R14
#   0x100  16 x 16   XMM0-15, low half first
#
# It prints 'R' on COM1 when it starts and '.' every 16 checkpoints.  It
# uses no stack: RSP is the checkpoint cursor.  The checkpoint code uses
# RAX, RCX and RDX as temporaries after saving them; no other register ever
# holds anything but state.  Position-independent: it may be loaded anywhere
# below 1 MiB.

        .set    COM1, 0x3f8
        .set    INTERVAL, 1024          # a power of two
        .set    HASH_MUL, 0x5bd1e995
        .set    INFO, 0x700
        .set    R_RING_START, INFO + 0x00
        .set    R_RING_END, INFO + 0x08
        .set    R_INTERVAL, INFO + 0x10
        .set    R_COUNT, INFO + 0x18
        .set    R_NEXT, INFO + 0x20
        .set    R_LAST_HASH, INFO + 0x28
        .set    SCRATCH, INFO + 0x80
        .set    ENTRY, 512
        .set    E_ITER, 0x000
        .set    E_PREV, 0x008
        .set    E_HASH, 0x010
        .set    E_GPR, 0x020
        .set    E_XMM, 0x100

        # g[k] = rol(g[k] ^ prev, rot)
        .macro  XROL dst, prev, rot
        xor     \prev, \dst
        rol     $\rot, \dst
        .endm

        # g[k] = (g[k] + prev) * mul
        .macro  AMUL dst, prev, mul
        add     \prev, \dst
        imul    $\mul, \dst, \dst
        .endm

        # x[j] = swap_halves(x[j] op prev)
        .macro  XMIX op, dst, prev
        \op     \prev, \dst
        pshufd  $0x4e, \dst, \dst
        .endm

        # One hash step over the u64 at \off(%rsp); %rax = h, %rcx scratch.
        .macro  HASH off
        xor     \off(%rsp), %rax
        imul    $HASH_MUL, %rax, %rax
        mov     %rax, %rcx
        shr     $29, %rcx
        xor     %rcx, %rax
        .endm

        .code64
        .text
        .globl  _start
_start:
        movq    $INTERVAL, R_INTERVAL
        movq    $0, R_COUNT
        movq    $0, R_LAST_HASH
        mov     R_RING_START, %rax
        mov     %rax, R_NEXT
        mov     $'R', %al
        mov     $COM1, %dx
        out     %al, %dx

        movabs  $0x243f6a8885a308d3, %rax       # seeds: digits of pi
        movabs  $0x13198a2e03707344, %rbx
        movabs  $0xa4093822299f31d0, %rcx
        movabs  $0x082efa98ec4e6c89, %rdx
        movabs  $0x452821e638d01377, %rsi
        movabs  $0xbe5466cf34e90c6c, %rdi
        movabs  $0xc0ac29b7c97c50dd, %rbp
        movabs  $0x3f84d5b5b5470917, %r8
        movabs  $0x9216d5d98979fb1b, %r9
        movabs  $0xd1310ba698dfb5ac, %r10
        movabs  $0x2ffd72dbd01adfb7, %r11
        movabs  $0xb8e1afed6a267e96, %r12
        movabs  $0xba7c9045f12c7f99, %r13
        movabs  $0x24a19947b3916cf7, %r14
        xor     %r15d, %r15d
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
        movdqu  xmm_seeds + 16 * \n(%rip), %xmm\n
        .endr
        jmp     checkpoint              # checkpoint 0: the seeds themselves

loop:
        add     %r15, %rax
        XROL    %rax, %r14, 7
        AMUL    %rbx, %rax, 0x2545f491
        XROL    %rcx, %rbx, 13
        AMUL    %rdx, %rcx, 0x5851f42d
        XROL    %rsi, %rdx, 17
        AMUL    %rdi, %rsi, 0x6c078965
        XROL    %rbp, %rdi, 23
        AMUL    %r8, %rbp, 0x41c64e6d
        XROL    %r9, %r8, 29
        AMUL    %r10, %r9, 0x0019660d
        XROL    %r11, %r10, 31
        AMUL    %r12, %r11, 0x27d4eb2f
        XROL    %r13, %r12, 37
        AMUL    %r14, %r13, 0x165667b1

        XMIX    paddq, %xmm0, %xmm15
        XMIX    pxor, %xmm1, %xmm0
        XMIX    paddq, %xmm2, %xmm1
        XMIX    pxor, %xmm3, %xmm2
        XMIX    paddq, %xmm4, %xmm3
        XMIX    pxor, %xmm5, %xmm4
        XMIX    paddq, %xmm6, %xmm5
        XMIX    pxor, %xmm7, %xmm6
        XMIX    paddq, %xmm8, %xmm7
        XMIX    pxor, %xmm9, %xmm8
        XMIX    paddq, %xmm10, %xmm9
        XMIX    pxor, %xmm11, %xmm10
        XMIX    paddq, %xmm12, %xmm11
        XMIX    pxor, %xmm13, %xmm12
        XMIX    paddq, %xmm14, %xmm13
        XMIX    pxor, %xmm15, %xmm14

        # GPRs <-> XMMs through memory: no register is free to carry them.
        mov     %r13, SCRATCH
        mov     %r14, SCRATCH + 8
        paddq   SCRATCH, %xmm0
        movdqa  %xmm15, SCRATCH
        add     SCRATCH, %rax
        xor     SCRATCH + 8, %rbx

        inc     %r15
        test    $INTERVAL - 1, %r15d
        jnz     loop

checkpoint:
        mov     R_NEXT, %rsp
        mov     %r15, E_ITER(%rsp)
        .set    off, E_GPR
        .irp    reg, rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14
        mov     %\reg, off(%rsp)
        .set    off, off + 8
        .endr
        .irp    n, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
        movdqa  %xmm\n, E_XMM + 16 * \n(%rsp)
        .endr

        # The state is saved: RAX, RCX and RDX are free until restored below.
        mov     R_LAST_HASH, %rax
        mov     %rax, E_PREV(%rsp)
        HASH    E_ITER
        .set    off, E_GPR
        .rept   14
        HASH    off
        .set    off, off + 8
        .endr
        .set    off, E_XMM
        .rept   32
        HASH    off
        .set    off, off + 8
        .endr
        mov     %rax, E_HASH(%rsp)
        mov     %rax, R_LAST_HASH
        incq    R_COUNT                 # the entry is complete: count it

        testb   $15, R_COUNT
        jnz     1f
        mov     $'.', %al
        mov     $COM1, %dx
        out     %al, %dx
1:      lea     ENTRY(%rsp), %rax
        cmp     R_RING_END, %rax
        jb      2f
        mov     R_RING_START, %rax
2:      mov     %rax, R_NEXT

        mov     E_GPR + 0(%rsp), %rax
        mov     E_GPR + 16(%rsp), %rcx
        mov     E_GPR + 24(%rsp), %rdx
        jmp     loop

        .p2align 4
xmm_seeds:                              # more digits of pi
        .quad   0x0801f2e2858efc16, 0x636920d871574e69
        .quad   0xa458fea3f4933d7e, 0x0d95748f728eb658
        .quad   0x718bcd5882154aee, 0x7b54a41dc25a59b5
        .quad   0x9c30d5392af26013, 0xc5d1b023286085f0
        .quad   0xca417918b8db38ef, 0x8e79dcb0603a180e
        .quad   0x6c9e0e8bb01e8a3e, 0xd71577c1bd314b27
        .quad   0x78af2fda55605c60, 0xe65525f3aa55ab94
        .quad   0x5748986263e81440, 0x55ca396a2aab10b6
        .quad   0xb4cc5c341141e8ce, 0xa15486af7c72e993
        .quad   0xb3ee1411636fbc2a, 0x2ba9c55d741831f6
        .quad   0xce5c3e169b87931e, 0xafd6ba336c24cf5c
        .quad   0x7a32538128958677, 0x3b8f48986b4bb9af
        .quad   0xc4bfe81b66282193, 0x61d809ccfb21a991
        .quad   0x487cac605dec8032, 0xef845d5de98575b1
        .quad   0xdc262302eb651b88, 0x23893e81d396acc5
        .quad   0x0f6d6ff383f44239, 0x2e0b4482a4842004
