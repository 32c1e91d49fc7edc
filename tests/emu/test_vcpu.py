"""vCPUs in Unicorn: they run guest code over shared RAM, pause at instruction boundaries,
move their registers through a VMSA, run in parallel, and end cleanly however the guest ends."""

from __future__ import annotations

import mmap
import struct
import threading
import time

import attrs
import pytest
from guest_console import Console
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmig.errors import PlatformError
from vmmig.guests.ab_check import ab_passes, ab_region, check_ab
from vmmig.guests.build import build_from_source
from vmmig.guests.emu import PROGRAM_GPA, AbParams, load_image, load_program
from vmmig.platforms.emu.console import COM1
from vmmig.platforms.emu.vcpu import (
    CPUID_HV_BASE,
    CPUID_HV_TIMING,
    CPUID_HV_VENDOR,
    Vcpu,
    VcpuState,
    tsc_hz,
)
from vmmig.platforms.emu.vmsa import XMM_COUNT, Segment


MIB = 1 << 20


@pytest.fixture
def make_ram():
    made: list[mmap.mmap] = []

    def make(size: int = 32 * MIB) -> mmap.mmap:
        made.append(mmap.mmap(-1, size))
        return made[-1]

    yield make
    for ram in made:
        ram.close()  # BufferError here would mean a vCPU still maps it


@pytest.fixture
def vcpus(make_ram):
    made: list[Vcpu] = []

    def make(ram: mmap.mmap, console: Console | None = None, index: int = 0) -> Vcpu:
        made.append(Vcpu(index, ram, on_port_write=console.write if console else None))
        return made[-1]

    yield make
    for cpu in made:
        cpu.stop()


def ab64(ram: mmap.mmap, cache, region: int = 16 * MIB):
    """Load ab64 over [1 MiB, 1 MiB + region) and return its entry VMSA."""
    return load_program(ram, "ab64", params=AbParams(end=MIB + region), cache_dir=cache).vmsa


def custom(source: str, cache) -> bytes:
    """A test program: 64-bit code entered at its first instruction."""
    text = f"        .code64\n        .globl _start\n_start:\n{source}\n"
    return build_from_source(text.encode(), stem="test", cache_dir=cache,
                             flat64_base=PROGRAM_GPA).read_bytes()


def started(cpu: Vcpu, vmsa) -> Vcpu:
    cpu.load_vmsa(vmsa)
    cpu.run_thread()
    return cpu


class TestExecution:
    """A vCPU executes a guest over the machine's RAM and pauses between instructions."""

    def test_ab64_dirties_memory_and_keeps_the_rule(self, make_ram, vcpus, cache):
        """ab64 over 16 MiB changes memory, and the a-b rule holds when it is paused."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache))
        console.wait_for("B", 2)
        cpu.pause()
        assert cpu.state is VcpuState.PAUSED
        assert ab_passes(ram) >= 2
        result = check_ab(ram)
        assert result.ok, result.detail
        assert result.pages == 4096

    def test_ab64_catches_a_page_that_breaks_the_rule_and_halts(self, make_ram, vcpus, cache):
        """A byte changed behind the guest's back: its own check prints X and halts."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache))
        console.wait_for("B", 1)
        cpu.pause()
        page = ab_region(ram)[0] + 7 * 4096
        ram[page] = (ram[page] + 3) % 256
        cpu.resume()
        assert cpu.wait(10) is VcpuState.HALTED
        assert console.text.endswith("X"), console.text[-20:]

    def test_ab64_passes_its_own_check_while_nothing_interferes(self, make_ram, vcpus, cache):
        """Paused and resumed many times, the guest never finds a page out of step."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache))
        for marks in range(1, 21):
            console.wait_for("B", marks)
            cpu.pause()
            cpu.resume()
        assert "X" not in console.text
        assert cpu.state is VcpuState.RUNNING

    def test_pause_and_resume_in_a_row_keep_the_rule(self, make_ram, vcpus, cache):
        """Pausing and resuming many times, immediately or after progress, never breaks the rule."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache, region=MIB))
        for i in range(150):
            if i % 5 == 0:
                console.wait_for("B", i // 5 + 1)
            cpu.pause()
            result = check_ab(ram)
            assert result.ok, f"after pause {i}: {result.detail}"
            cpu.resume()

    def test_saved_vmsa_continues_on_a_fresh_vcpu(self, make_ram, vcpus, cache):
        """Registers saved at a pause and loaded into a new vCPU over the same RAM continue."""
        ram, first_console, second_console = make_ram(), Console(), Console()
        first = started(vcpus(ram, first_console), ab64(ram, cache))
        first_console.wait_for("B", 1)
        first.pause()
        saved = first.vmsa
        passes = ab_passes(ram)
        first.stop()

        second = vcpus(ram, second_console, index=1)
        second.load_vmsa(saved)
        assert second.save_vmsa() == saved
        second.run_thread()
        second_console.wait_for("B", 2)
        second.pause()
        assert "A" not in second_console.text, "the new vCPU started the program afresh"
        assert ab_passes(ram) >= passes + 1  # counting on, not from zero
        result = check_ab(ram)
        assert result.ok, result.detail

    def test_two_vcpus_run_in_parallel(self, make_ram, vcpus, cache):
        """Two vCPUs make progress at the same time; their combined speed is printed."""
        marks = 256  # 'B' marks, a pass over 16 MiB each
        alone_console = Console()
        alone_ram = make_ram()
        alone = started(vcpus(alone_ram, alone_console), ab64(alone_ram, cache))
        alone_console.wait_for("A", 1)
        begin = time.perf_counter()
        alone_console.wait_for("B", marks)
        one = marks / (time.perf_counter() - begin)
        alone.stop()

        rams = [make_ram(), make_ram()]
        consoles = [Console(), Console()]
        cpus = [started(vcpus(ram, console, index=i), ab64(ram, cache))
                for i, (ram, console) in enumerate(zip(rams, consoles, strict=True))]
        for console in consoles:
            console.wait_for("A", 1)
        begin = time.perf_counter()
        for console in consoles:
            console.wait_for("B", marks)
        both = 2 * marks / (time.perf_counter() - begin)
        for cpu in cpus:
            cpu.pause()
        assert all(check_ab(ram).ok for ram in rams)
        print(f"\nab64 over 16 MiB: one vCPU {one:.0f} passes/s "
              f"({one * 4096 * 4 / 1e6:.1f} M instructions/s); two vCPUs {both:.0f} passes/s "
              f"combined ({both / one:.2f} x)")

    def test_port_writes_reach_the_handler(self, make_ram, vcpus, cache):
        """Each OUT reaches on_port_write with its port, size and value, in program order."""
        ram = make_ram()
        seen: list[tuple[int, int, int]] = []
        done = threading.Event()

        def record(port: int, size: int, value: int) -> None:
            seen.append((port, size, value))
            if len(seen) == 3:
                done.set()

        cpu = Vcpu(0, ram, on_port_write=record)
        try:
            image = custom("mov $0x3f8, %dx\nmov $'x', %al\nout %al, %dx\n"
                           "mov $0x510, %dx\nmov $0x1234, %ax\nout %ax, %dx\n"
                           "mov $0x12345678, %eax\nout %eax, $0x80\nhlt", cache)
            started(cpu, load_image(ram, image).vmsa)
            assert done.wait(10)
            assert cpu.wait(10) is VcpuState.HALTED
        finally:
            cpu.stop()
        assert seen == [(COM1, 1, ord("x")), (0x510, 2, 0x1234), (0x80, 4, 0x12345678)]


flags = st.lists(st.sampled_from([0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800])).map(
    lambda bits: 0x2 | sum(set(bits)))
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


class TestRegisters:
    """Register state moves between Unicorn and the VMSA without loss."""

    @settings(max_examples=25, deadline=None)
    @given(plain=st.fixed_dictionaries({name: u64 for name in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
        "r12", "r13", "r14", "r15", "rip", "cr2", "dr6", "dr7")}),
        rflags=flags, xmm=st.tuples(*[st.integers(0, (1 << 128) - 1)] * XMM_COUNT),
        mxcsr=st.sampled_from([0x1F80, 0x9FC0, 0x3F80]),
        tables=st.fixed_dictionaries({name: st.builds(
            Segment, st.integers(0, 0xFFFF), st.integers(0, 0xFFF), st.integers(0, 0xFFFFFFFF),
            u64) for name in ("ldtr", "tr")}),
        fs_base=u64, gs_base=u64)
    def test_load_then_save_returns_the_same_state(self, plain, rflags, xmm, mxcsr, tables,
                                                    fs_base, gs_base):
        """GPRs, RIP, RFLAGS, CR2, DRs, MXCSR, XMM0-15, LDTR, TR and FS/GS bases read back."""
        with mmap.mmap(-1, 2 * MIB) as ram:
            entry = load_image(ram, b"\xf4")
            vmsa = attrs.evolve(entry.vmsa, rflags=rflags, xmm=xmm, mxcsr=mxcsr,
                                fs=attrs.evolve(entry.vmsa.fs, base=fs_base),
                                gs=attrs.evolve(entry.vmsa.gs, base=gs_base), **plain, **tables)
            cpu = Vcpu(0, ram)
            try:
                cpu.load_vmsa(vmsa)
                assert cpu.save_vmsa() == vmsa
            finally:
                cpu.stop()

    def test_segment_parts_unicorn_lacks_come_from_the_loaded_vmsa(self, make_ram, vcpus, cache):
        """Selectors come from Unicorn; CS attributes, which it lacks, survive from the load."""
        ram = make_ram(4 * MIB)
        entry = load_image(ram, b"\xf4").vmsa
        cpu = vcpus(ram)
        cpu.load_vmsa(entry)
        saved = cpu.save_vmsa()
        assert saved.cs == Segment(0x08, 0xA9B, 0xFFFFFFFF, 0)
        assert saved.gdtr == entry.gdtr
        assert (saved.cr0, saved.cr3, saved.cr4, saved.efer) == (
            entry.cr0, entry.cr3, entry.cr4, entry.efer)

    def test_paging_is_honoured(self, make_ram, vcpus, cache):
        """A page-table entry moved by the host redirects the guest's store to another frame."""
        ram = make_ram(16 * MIB)
        entry = load_image(ram, custom("movb $0x5a, 0x400000\nhlt", cache))
        pd = 0x3000
        ram[pd + 8 * 2:pd + 8 * 3] = (0x800000 | 0xE3).to_bytes(8, "little")  # VA 4 MiB -> 8 MiB
        cpu = started(vcpus(ram), entry.vmsa)
        assert cpu.wait(10) is VcpuState.HALTED
        assert (ram[0x800000], ram[0x400000]) == (0x5A, 0)

    def test_registers_are_refused_while_running(self, make_ram, vcpus, cache):
        """Loading or saving registers of a running vCPU fails; pausing first works."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache, region=MIB))
        console.wait_for("A", 1)
        with pytest.raises(PlatformError, match="running"):
            cpu.save_vmsa()
        with pytest.raises(PlatformError, match="running"):
            cpu.load_vmsa(cpu.vmsa)
        cpu.pause()
        assert cpu.save_vmsa() == cpu.vmsa


class TestExits:
    """However the guest ends, the vCPU reports it in its state, never on stderr."""

    def run_to_end(self, make_ram, vcpus, cache, source: str, size: int = 16 * MIB) -> Vcpu:
        ram = make_ram(size)
        cpu = started(vcpus(ram), load_image(ram, custom(source, cache)).vmsa)
        assert cpu.wait(10) is not VcpuState.RUNNING
        return cpu

    def test_hlt_halts(self, make_ram, vcpus, cache):
        """HLT ends the vCPU as halted, saying where."""
        cpu = self.run_to_end(make_ram, vcpus, cache, "nop\nhlt")
        assert cpu.state is VcpuState.HALTED
        assert cpu.detail == f"hlt at rip={PROGRAM_GPA + 1:#x}"
        assert cpu.vmsa.rip == PROGRAM_GPA + 2

    def test_code_at_address_zero_runs(self, make_ram, vcpus, cache):
        """A jump to GPA 0 executes what is there (Unicorn's own end address is never 0)."""
        ram = make_ram(4 * MIB)
        entry = load_image(ram, custom("jmp *%rax", cache))
        ram[0] = 0xF4
        cpu = started(vcpus(ram), entry.vmsa)
        assert cpu.wait(10) is VcpuState.HALTED
        assert cpu.detail == "hlt at rip=0x0"

    def test_access_beyond_ram_crashes_with_the_address(self, make_ram, vcpus, cache, capfd):
        """A store beyond the identity map page-faults: crashed, naming the address."""
        cpu = self.run_to_end(make_ram, vcpus, cache, "movb $1, 0x7fff0000\nhlt")
        assert cpu.state is VcpuState.CRASHED
        assert "#PF" in cpu.detail
        assert "0x7fff0000" in cpu.detail
        assert capfd.readouterr().err == ""

    def test_access_to_a_gpa_without_ram_crashes_with_the_address(self, make_ram, vcpus, cache,
                                                                   capfd):
        """A store mapped by the page tables but past the end of RAM crashes, naming the GPA."""
        cpu = self.run_to_end(make_ram, vcpus, cache, "movq $1, 0x1100008\nhlt", size=17 * MIB)
        assert cpu.state is VcpuState.CRASHED
        assert "write of 8 bytes at 0x1100008" in cpu.detail
        assert capfd.readouterr().err == ""

    def test_invalid_instruction_crashes(self, make_ram, vcpus, cache, capfd):
        """An undefined opcode crashes the vCPU, naming the instruction's address."""
        cpu = self.run_to_end(make_ram, vcpus, cache, "nop\nud2")
        assert cpu.state is VcpuState.CRASHED
        assert "Invalid instruction" in cpu.detail
        assert f"rip={PROGRAM_GPA + 1:#x}" in cpu.detail
        assert capfd.readouterr().err == ""

    def test_failing_port_handler_crashes(self, make_ram, capfd, cache):
        """An exception in on_port_write crashes the vCPU with its message."""
        ram = make_ram(16 * MIB)

        def broken(port: int, size: int, value: int) -> None:
            raise RuntimeError("device on fire")

        cpu = Vcpu(0, ram, on_port_write=broken)
        try:
            started(cpu, load_image(ram, custom("out %al, $0x80\nhlt", cache)).vmsa)
            assert cpu.wait(10) is VcpuState.CRASHED
        finally:
            cpu.stop()
        assert "device on fire" in cpu.detail
        assert capfd.readouterr().err == ""


class TestCpuid:
    """CPUID: the hypervisor leaves are the vCPU's, the others Unicorn's."""

    ANSWERS = 0x400000

    def cpuid(self, make_ram, vcpus, cache, leaves: list[int]) -> list[tuple[int, ...]]:
        """EAX, EBX, ECX and EDX of CPUID for each value of RAX, as a guest sees them."""
        steps = "".join(
            f"movabs ${leaf:#x}, %rax\ncpuid\n"
            + "".join(f"mov %{reg}, {self.ANSWERS + 16 * i + 4 * j:#x}\n"
                      for j, reg in enumerate(("eax", "ebx", "ecx", "edx")))
            for i, leaf in enumerate(leaves))
        ram = make_ram(8 * MIB)
        cpu = started(vcpus(ram), load_image(ram, custom(steps + "hlt", cache)).vmsa)
        assert cpu.wait(10) is VcpuState.HALTED, cpu.detail
        return [struct.unpack_from("<4I", ram, self.ANSWERS + 16 * i) for i in range(len(leaves))]

    def test_the_hypervisor_leaves_give_the_tsc_rate(self, make_ram, vcpus, cache):
        """The base leaf leads to the timing leaf, whose EAX is the TSC in kHz; RAX's
        upper half is ignored, leaves between the two are zeros, others are Unicorn's."""
        base, timing, between, basic = self.cpuid(
            make_ram, vcpus, cache, [CPUID_HV_BASE, 0xFFFF_FFFF << 32 | CPUID_HV_TIMING,
                                     CPUID_HV_BASE + 1, 0])
        assert base == (CPUID_HV_TIMING, *struct.unpack("<3I", CPUID_HV_VENDOR))
        assert timing == (round(tsc_hz() / 1000), 0, 0, 0)
        assert between == (0, 0, 0, 0)
        assert basic[0] >= 1, "leaf 0 is Unicorn's: the highest basic leaf"
        assert basic[1:] != base[1:]


class TestLifecycle:
    """Starting, resuming and stopping follow the vCPU's state."""

    def test_stop_releases_the_ram(self, make_ram, cache):
        """The RAM cannot be unmapped while a vCPU maps it, and can after stop()."""
        ram = mmap.mmap(-1, 4 * MIB)
        cpu = Vcpu(0, ram)
        with pytest.raises(BufferError):
            ram.close()
        cpu.stop()
        assert cpu.state is VcpuState.STOPPED
        ram.close()

    def test_stop_ends_a_running_vcpu(self, make_ram, vcpus, cache):
        """stop() ends a running vCPU's thread, saving its registers."""
        ram, console = make_ram(), Console()
        cpu = started(vcpus(ram, console), ab64(ram, cache, region=MIB))
        console.wait_for("B", 1)
        cpu.stop()
        assert cpu.state is VcpuState.STOPPED
        assert PROGRAM_GPA <= cpu.vmsa.rip < PROGRAM_GPA + 0x100

    def test_resume_needs_a_paused_started_vcpu(self, make_ram, vcpus, cache):
        """resume() refuses a vCPU never started or running; run_thread() refuses a second start."""
        ram, console = make_ram(), Console()
        cpu = vcpus(ram, console)
        cpu.load_vmsa(ab64(ram, cache, region=MIB))
        with pytest.raises(PlatformError, match="never started"):
            cpu.resume()
        assert not cpu.thread_started
        cpu.run_thread()
        assert cpu.thread_started
        with pytest.raises(PlatformError, match="running"):
            cpu.resume()
        with pytest.raises(PlatformError, match="started before"):
            cpu.run_thread()
        cpu.pause()
        cpu.pause()  # pausing a paused vCPU does nothing
        assert cpu.state is VcpuState.PAUSED

    def test_halted_vcpu_cannot_be_resumed(self, make_ram, vcpus, cache):
        """A halted vCPU stays halted: pause() is a no-op and resume() is refused."""
        ram = make_ram(4 * MIB)
        cpu = started(vcpus(ram), load_image(ram, custom("hlt", cache)).vmsa)
        assert cpu.wait(10) is VcpuState.HALTED
        cpu.pause()
        with pytest.raises(PlatformError, match="halted"):
            cpu.resume()
        cpu.stop()
        assert cpu.state is VcpuState.HALTED
