# dirty.S - a rate-controlled memory dirtier for the emulated platform.
#
# Writes a fresh 64-bit value (the running write count) into the first 8
# bytes of a given number of pages per "tick", so each write changes the
# page whatever compares it, and a precopy has that many newly dirtied pages
# per second to chase: "dirty:64M" is 16384 pages/s.  Pages are taken in
# address order, wrapping at the end of the region, or at random (xorshift64).
#
# Time is the TSC: Unicorn passes the host's through, and the hypervisor
# gives its rate in kHz in CPUID leaf 0x40000010 (EAX), as VMware and KVM
# do, when leaf 0x40000000 (EAX) says it goes that far.  The guest derives
# its tick length from that rate at start: the host writes only the rate
# asked, because the block is part of an SEV guest's measured launch image,
# which must be the same whichever host builds it.  Without the leaf (or
# with a TSC rate of 0) there is no clock to keep a rate by: the guest
# prints '?' and halts.  Between ticks the guest idles through the vCPU's
# idle port (vmmig.platforms.emu.vcpu.IDLE_PORT, the microseconds to wait)
# instead of spinning, as a real vCPU would HLT until its timer.  A late
# tick is caught up (a burst) if less than MAX_LAG_TICKS late; later than
# that (after a pause, a migration), or when the TSC went backwards
# (another host), the schedule starts afresh from now.
#
# Block at 0x600 (u64s), written by vmmig.guests.emu.load_program:
#   0x600  start        (host)  first byte of the region, page aligned
#   0x608  end          (host)  end of the region, exclusive, page aligned
#   0x610  per_tick     (host)  pages written per tick, >= 1
#   0x618  rate         (host)  bytes to dirty per second, >= 1
#   0x620  random       (host)  0: address order, 1: random pages
#   0x628  seed         (host)  xorshift64 state, non-zero
#   0x630  tick_tsc     (guest) TSC cycles per tick, >= 1
#   0x638  tsc_per_us   (guest) TSC cycles per microsecond, >= 1
#   0x640  writes       (guest) pages written so far
#   0x648  ticks        (guest) ticks so far
#
# It prints 'D' on COM1 when it starts and '.' every 256 ticks.
# Position-independent: it may be loaded anywhere below 1 MiB.

        .set    COM1, 0x3f8
        .set    IDLE_PORT, 0xe0
        .set    PAGE, 0x1000
        .set    MAX_LAG_TICKS, 64
        .set    CPUID_HV_BASE, 0x40000000
        .set    CPUID_HV_TIMING, 0x40000010
        .set    INFO, 0x600
        .set    D_START, INFO + 0x00
        .set    D_END, INFO + 0x08
        .set    D_PER_TICK, INFO + 0x10
        .set    D_RATE, INFO + 0x18
        .set    D_RANDOM, INFO + 0x20
        .set    D_SEED, INFO + 0x28
        .set    D_TICK_TSC, INFO + 0x30
        .set    D_TSC_PER_US, INFO + 0x38
        .set    D_WRITES, INFO + 0x40
        .set    D_TICKS, INFO + 0x48

        .code64
        .text
        .globl  _start
_start:
        mov     $CPUID_HV_BASE, %eax
        cpuid
        cmp     $CPUID_HV_TIMING, %eax
        jb      no_clock                # no timing leaf
        mov     $CPUID_HV_TIMING, %eax
        cpuid
        test    %eax, %eax
        jz      no_clock
        mov     %eax, %esi              # %rsi = TSC kHz

        # A tick is per_tick pages at rate bytes/s: TSC Hz * per_tick * PAGE / rate
        # cycles, the product in 128 bits (for any per_tick the host derives from
        # rate, the quotient fits in 64).
        imul    $1000 * PAGE, %rsi, %rax
        mulq    D_PER_TICK
        divq    D_RATE
        cmp     $1, %rax                # at least 1 (the carry is set for 0)
        adc     $0, %rax
        mov     %rax, D_TICK_TSC
        lea     500(%rsi), %rax         # TSC cycles per microsecond, rounded, at least 1
        xor     %edx, %edx
        mov     $1000, %ecx
        div     %rcx
        cmp     $1, %rax
        adc     $0, %rax
        mov     %rax, D_TSC_PER_US

        # Registers for the whole run:
        #   %r8 start, %r9 end, %r10 pages in the region, %r11 pages per tick,
        #   %r12 tick length, %r13 random?, %r14 xorshift state, %r15 deadline
        #   of the current tick, %rbx next page (address order), %rbp the
        #   lateness still caught up, %rsi TSC cycles per microsecond.
        mov     D_START, %r8
        mov     D_END, %r9
        mov     %r9, %r10
        sub     %r8, %r10
        shr     $12, %r10
        mov     D_PER_TICK, %r11
        mov     D_TICK_TSC, %r12
        mov     D_RANDOM, %r13
        mov     D_SEED, %r14
        mov     D_TSC_PER_US, %rsi
        imul    $MAX_LAG_TICKS, %r12, %rbp
        mov     %r8, %rbx
        movq    $0, D_WRITES
        movq    $0, D_TICKS

        mov     $'D', %al
        mov     $COM1, %dx
        out     %al, %dx

        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax
        mov     %rax, %r15              # the first tick is due now

tick:
        mov     %r11, %rcx              # pages left in this tick
page:
        test    %r13, %r13
        jnz     random
        mov     %rbx, %rdi              # address order: take the cursor, advance it
        add     $PAGE, %rbx
        cmp     %r9, %rbx
        jb      write
        mov     %r8, %rbx
        jmp     write
random:
        mov     %r14, %rax              # xorshift64 (Marsaglia 2003): 13, 7, 17
        shl     $13, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shr     $7, %rax
        xor     %rax, %r14
        mov     %r14, %rax
        shl     $17, %rax
        xor     %rax, %r14
        mov     %r14, %rax              # page = (high half of the state * pages) >> 32:
        shr     $32, %rax               # a uniform index without a division
        imul    %r10, %rax
        shr     $32, %rax
        shl     $12, %rax
        lea     (%r8,%rax), %rdi
write:
        mov     D_WRITES, %rax
        inc     %rax
        mov     %rax, D_WRITES
        mov     %rax, (%rdi)            # a value this page never held before
        dec     %rcx
        jnz     page

        incq    D_TICKS
        testb   $255, D_TICKS
        jnz     1f
        mov     $'.', %al
        mov     $COM1, %dx
        out     %al, %dx
1:      add     %r12, %r15              # the next tick is due one tick later

wait:
        rdtsc
        shl     $32, %rdx
        or      %rdx, %rax              # %rax = now
        mov     %r15, %rcx
        sub     %rax, %rcx              # %rcx = deadline - now
        jle     due
        lea     (%r12,%r12), %rdx
        cmp     %rdx, %rcx
        ja      resync                  # more than two ticks ahead: the TSC went back
        mov     %rcx, %rax
        xor     %edx, %edx
        div     %rsi                    # %rax = microseconds to the deadline
        test    %rax, %rax
        jz      wait                    # under a microsecond: spin
        out     %eax, $IDLE_PORT
        jmp     wait
due:
        neg     %rcx                    # %rcx = how late
        cmp     %rbp, %rcx
        jbe     tick                    # catch up
resync:
        mov     %rax, %r15              # too late (or early) to catch up: start afresh now
        jmp     tick

no_clock:
        mov     $'?', %al
        mov     $COM1, %dx
        out     %al, %dx
        hlt
