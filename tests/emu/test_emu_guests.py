"""The emulated platform's guest programs: built from source, loaded as firmware would, and
each doing what its checker or counters say: a-b pages, a set dirtying rate, a register chain
that breaks when one register is lost."""

from __future__ import annotations

import mmap
import re
import shutil
import struct
import subprocess
import time

import attrs
import numpy as np
import pytest
from guest_console import Console

from vmmig.guests.ab_check import ab_region, check_ab
from vmmig.guests.emu import (
    DIRTY_INFO,
    PROGRAM_GPA,
    PROGRAMS,
    AbParams,
    DirtyParams,
    RegsParams,
    build_program,
    dirty_counts,
    load_program,
    program_source,
)
from vmmig.guests.emu.regs_check import (
    ENTRY_SIZE,
    REGS_INFO,
    check_regs_chain,
    regs_checkpoints,
)
from vmmig.platforms.emu import vcpu
from vmmig.platforms.emu.guest_checks import CHAIN_BROKEN, CHAIN_INTACT, watch_regs_chain
from vmmig.platforms.emu.vcpu import Vcpu, VcpuState, tsc_hz


MIB = 1 << 20
PAGE = 4096


@pytest.fixture
def machine(cache):
    """Make (ram, vcpu, console) triples; stops the vCPUs, then unmaps the RAMs."""
    made: list[tuple[mmap.mmap, Vcpu]] = []

    def make(name, size=16 * MIB, params=None, entry_gpa=PROGRAM_GPA):
        ram, console = mmap.mmap(-1, size), Console()
        entry = load_program(ram, name, entry_gpa, params=params, cache_dir=cache)
        cpu = Vcpu(len(made), ram, on_port_write=console.write)
        made.append((ram, cpu))
        cpu.load_vmsa(entry.vmsa)
        return ram, cpu, console

    yield make
    for ram, cpu in made:
        cpu.stop()
        ram.close()


class TestBuild:
    """The programs build from their shipped sources into flat binaries."""

    @pytest.mark.parametrize("name", PROGRAMS)
    def test_builds_and_is_cached(self, name, tmp_path, monkeypatch):
        """Each program builds once; a second build comes from the cache without tools."""
        first = build_program(name, tmp_path)
        assert 0 < len(first) < 0x10000
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
        assert build_program(name, tmp_path) == first

    @pytest.mark.parametrize("name", PROGRAMS)
    def test_no_instruction_but_hlt_ends_in_f4(self, name, tmp_path):
        """No instruction of a shipped program ends in 0xf4, which the vCPU would take for HLT."""
        tools = [shutil.which(tool) for tool in ("as", "objdump")]
        if None in tools:
            pytest.skip("GNU as and objdump (binutils) are needed")
        assembler, objdump = tools
        source, obj = tmp_path / f"{name}.S", tmp_path / f"{name}.o"
        source.write_bytes(program_source(name))
        subprocess.run([assembler, "--64", "-o", obj, source], check=True)
        listing = subprocess.run([objdump, "-d", obj], capture_output=True, text=True,
                                 check=True).stdout
        code = listing.split("<xmm_seeds>:")[0]  # regs's seed table is data, not code
        instructions = [m.group(1).split() for m in
                        re.finditer(r"^\s+[0-9a-f]+:\t((?:[0-9a-f]{2} )+)", code, re.MULTILINE)]
        assert len(instructions) > 20
        assert [i for i in instructions if i[-1] == "f4" and i != ["f4"]] == []

    def test_programs_are_position_independent(self, machine):
        """A program loaded away from its link address runs correctly."""
        ram, cpu, console = machine("regs", entry_gpa=0x40000)
        cpu.run_thread()
        console.wait_for(".", 2)
        cpu.pause()
        assert PROGRAM_GPA + 0x30000 <= cpu.vmsa.rip < 0x41000
        result = check_regs_chain(ram)
        assert result.ok, result.detail


class TestLoader:
    """load_program writes the program's block and refuses what does not fit."""

    def test_ab64_publishes_its_region(self, cache):
        """ab64's block is the boot-sector guest's, so ab_check finds the region."""
        with mmap.mmap(-1, 32 * MIB) as ram:
            load_program(ram, "ab64", params=AbParams(end=17 * MIB), cache_dir=cache)
            assert ab_region(ram) == (MIB, 17 * MIB)

    @pytest.mark.parametrize(("name", "params", "message"), [
        ("ab64", AbParams(end=33 * MIB), "not whole pages"),
        ("ab64", AbParams(end=MIB + 100), "not whole pages"),
        ("dirty", DirtyParams(start=0x8000), "not whole pages"),
        ("regs", RegsParams(ring_entries=1 << 20), "not whole pages"),
        ("regs", AbParams(), "takes RegsParams"),
    ])
    def test_bad_parameters_are_refused(self, cache, name, params, message):
        """A region outside RAM or below 1 MiB, or another program's parameters, is refused."""
        with mmap.mmap(-1, 32 * MIB) as ram, pytest.raises(ValueError, match=message):
            load_program(ram, name, params=params, cache_dir=cache)

    def test_program_must_fit_below_1_mib(self, cache):
        """A load address that would run into the data area is refused."""
        with mmap.mmap(-1, 4 * MIB) as ram, pytest.raises(ValueError, match="cannot be loaded"):
            load_program(ram, "regs", MIB - 0x100, cache_dir=cache)


class TestAb64:
    """ab64 is the a-b guest on the emulated platform."""

    def test_rule_holds_on_16_mib(self, machine):
        """After running over 16 MiB, the a-b checker finds the rule intact."""
        ram, cpu, console = machine("ab64", 32 * MIB, AbParams(end=17 * MIB))
        cpu.run_thread()
        console.wait_for("B", 1)
        cpu.pause()
        result = check_ab(ram)
        assert result.ok, result.detail
        assert console.text.startswith("AB")


def corrupt(field: str):
    """A change of one bit in one register of a VMSA."""
    if field.startswith("xmm"):
        j = int(field[3:])
        return lambda v: attrs.evolve(v, xmm=(*v.xmm[:j], v.xmm[j] ^ 1 << 100, *v.xmm[j + 1:]))
    return lambda v: attrs.evolve(v, **{field: getattr(v, field) ^ 1})


class TestRegs:
    """The register chain survives a save/load of the VMSA, and breaks when a register changes."""

    def migrate(self, machine, change=lambda vmsa: vmsa, verdicts=None):
        """Run regs, pause, move its VMSA (changed) to a fresh vCPU, run on, pause.

        :param verdicts: a list that gets the guest's own verdict on its chain
            (:mod:`vmmig.platforms.emu.guest_checks`), printed on its new console.
        """
        ram, first, console = machine("regs")
        first.run_thread()
        console.wait_for(".", 2)
        first.pause()
        before = regs_checkpoints(ram)
        saved = first.vmsa
        first.stop()

        second_console = Console()
        second = Vcpu(9, ram, on_port_write=second_console.write)
        try:
            second.load_vmsa(change(saved))
            watch = watch_regs_chain(ram, second_console)
            second.run_thread()
            second_console.wait_for(".", 2)
            watch.join(30)
            second.pause()
        finally:
            second.stop()
        if verdicts is not None:
            printed = second_console.counts()
            verdicts += [mark for mark in (CHAIN_INTACT, CHAIN_BROKEN) if printed.get(mark)]
        assert regs_checkpoints(ram) >= before + 16
        return ram, before

    def test_chain_survives_a_fresh_vcpu(self, machine):
        """Registers saved, loaded into a new vCPU and run on keep the chain intact."""
        verdicts: list[str] = []
        ram, before = self.migrate(machine, verdicts=verdicts)
        result = check_regs_chain(ram, since=before - 1)
        assert result.ok, result.detail
        assert verdicts == [CHAIN_INTACT], "the guest's own check agrees"
        assert result.verified == result.checkpoints - before
        whole = check_regs_chain(ram)
        assert whole.ok, whole.detail

    @pytest.mark.parametrize("register", ["r13", "rbx", "r15", "xmm7", "xmm0"])
    def test_one_changed_register_breaks_the_chain(self, machine, register):
        """One bit flipped in one register between save and load breaks the chain right there."""
        verdicts: list[str] = []
        ram, before = self.migrate(machine, corrupt(register), verdicts)
        result = check_regs_chain(ram, since=before - 1)
        assert not result.ok
        assert verdicts == [CHAIN_BROKEN], "the guest's own check catches it too"
        # One later if the pause fell inside the checkpoint code, after the state was stored.
        assert result.first_bad in (before, before + 1), result.detail
        assert not check_regs_chain(ram).ok


@pytest.fixture(scope="module")
def regs_image(tmp_path_factory):
    """A memory image of regs after some 32 checkpoints, in a ring of 64 slots."""
    cache = tmp_path_factory.mktemp("cache")
    with mmap.mmap(-1, 4 * MIB) as ram:
        console = Console()
        entry = load_program(ram, "regs", params=RegsParams(ring_entries=64), cache_dir=cache)
        cpu = Vcpu(0, ram, on_port_write=console.write)
        try:
            cpu.load_vmsa(entry.vmsa)
            cpu.run_thread()
            console.wait_for(".", 5)
            cpu.pause()
        finally:
            cpu.stop()
        return bytearray(ram)


class TestRegsChecker:
    """check_regs_chain reports tampered, misplaced and missing checkpoints."""

    @staticmethod
    def slot(image, number: int) -> int:
        """GPA of checkpoint ``number``'s ring slot."""
        start, end = struct.unpack_from("<2Q", image, REGS_INFO)
        return start + number % ((end - start) // ENTRY_SIZE) * ENTRY_SIZE

    def test_genuine_ring_is_intact(self, regs_image):
        """An untouched ring passes, its oldest slot left out."""
        result = check_regs_chain(regs_image)
        assert result.ok, result.detail
        assert result.verified == 62

    def test_changed_register_word_is_found(self, regs_image):
        """A changed register value in one checkpoint is reported at that checkpoint."""
        tampered = bytearray(regs_image)
        number = regs_checkpoints(regs_image) - 10
        tampered[self.slot(regs_image, number) + 0x20 + 8 * 12] ^= 0x40  # r13
        result = check_regs_chain(tampered)
        assert (result.ok, result.first_bad) == (False, number)

    def test_swapped_checkpoints_are_found(self, regs_image):
        """Two checkpoints exchanged in the ring are reported at the first of them."""
        tampered = bytearray(regs_image)
        number = regs_checkpoints(regs_image) - 20
        a, b = self.slot(regs_image, number), self.slot(regs_image, number + 1)
        tampered[a:a + ENTRY_SIZE], tampered[b:b + ENTRY_SIZE] = (
            regs_image[b:b + ENTRY_SIZE], regs_image[a:a + ENTRY_SIZE])
        result = check_regs_chain(tampered)
        assert (result.ok, result.first_bad) == (False, number)

    def test_overwritten_start_is_reported(self, regs_image):
        """Asking for a checkpoint the ring no longer holds is not ok."""
        result = check_regs_chain(regs_image, since=0)
        assert not result.ok
        assert "not in the ring" in result.detail


class TestDirty:
    """dirty writes newly dirtied pages at the rate asked, where asked."""

    def heads(self, ram, start, end):
        """The first u64 of every page in [start, end)."""
        return np.frombuffer(ram, dtype="<u8")[start // 8:end // 8:PAGE // 8].copy()

    def test_rate_is_kept(self, machine):
        """At 64 MiB/s the pages changed over a measured interval match the rate (loosely)."""
        rate = 64 * MIB
        ram, cpu, console = machine("dirty", 66 * MIB, DirtyParams(bytes_per_second=rate))
        start, end = struct.unpack_from("<2Q", ram, DIRTY_INFO)
        cpu.run_thread()
        console.wait_for("D", 1)

        def snapshot():
            """Page heads, bracketed by the guest's write counter and the clock."""
            (writes_before, _), t = dirty_counts(ram), time.monotonic()
            heads = self.heads(ram, start, end)
            return writes_before, heads, dirty_counts(ram)[0], t

        low0, before, high0, t0 = snapshot()
        time.sleep(0.5)  # the measurement window, not a synchronisation
        low1, after, high1, t1 = snapshot()
        changed = int(np.count_nonzero(after != before))
        expected = rate / PAGE * (t1 - t0)
        print(f"\ndirty at 64 MiB/s: {changed} pages in {t1 - t0:.3f} s "
              f"({changed * PAGE / (t1 - t0) / MIB:.1f} MiB/s)")
        assert expected / 2 < changed < expected * 2
        assert low1 - high0 <= changed <= high1 - low0, "the guest's counter disagrees"

    def test_the_tick_follows_the_tsc_rate_from_cpuid(self, machine):
        """The host gives the rate, the guest times its ticks by the TSC kHz CPUID gives it."""
        rate = 64 * MIB
        ram, cpu, console = machine("dirty", 4 * MIB, DirtyParams(bytes_per_second=rate))
        per_tick, given = struct.unpack_from("<2Q", ram, DIRTY_INFO + 0x10)
        assert (per_tick, given) == (16, rate)  # 16384 pages/s in ticks of 1 ms
        cpu.run_thread()
        console.wait_for("D", 1)
        tick_tsc, tsc_per_us = struct.unpack_from("<2Q", ram, DIRTY_INFO + 0x30)
        khz = round(tsc_hz() / 1000)
        assert tick_tsc == khz * 1000 * per_tick * PAGE // rate
        assert tsc_per_us == (khz + 500) // 1000

    def test_without_a_tsc_rate_it_halts(self, machine, monkeypatch):
        """A hypervisor that knows no TSC rate leaves no clock to keep a rate by: '?' and halt."""
        monkeypatch.setattr(vcpu, "tsc_hz", lambda: 0.0)
        ram, cpu, console = machine("dirty", 4 * MIB)
        cpu.run_thread()
        assert cpu.wait(10) is VcpuState.HALTED
        assert console.text == "?"
        assert dirty_counts(ram) == (0, 0)

    def test_random_pages_stay_in_the_region(self, machine):
        """Random mode spreads its writes over the region and writes nothing outside it."""
        region = (4 * MIB, 8 * MIB)
        params = DirtyParams(bytes_per_second=256 * MIB, start=region[0], end=region[1],
                             pattern="random")
        ram, cpu, console = machine("dirty", 12 * MIB, params)
        outside = bytes(ram[region[1]:]) + bytes(ram[MIB:region[0]])
        cpu.run_thread()
        console.wait_for(".", 1)
        cpu.pause()
        heads = self.heads(ram, *region)
        writes, ticks = dirty_counts(ram)
        assert ticks >= 256
        assert np.count_nonzero(heads) > 0.5 * len(heads)
        assert int(heads.max()) <= writes
        assert bytes(ram[region[1]:]) + bytes(ram[MIB:region[0]]) == outside

    def test_slow_dirtier_idles(self, machine):
        """At a low rate the vCPU idles between ticks instead of spinning on a core."""
        ram, cpu, console = machine("dirty", 4 * MIB, DirtyParams(bytes_per_second=MIB))
        cpu.run_thread()
        console.wait_for("D", 1)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        time.sleep(0.3)  # the measurement window, not a synchronisation
        busy = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
        cpu.pause()
        assert cpu.state is VcpuState.PAUSED
        assert busy < 0.5, f"the process used {busy:.0%} of a core"
        assert dirty_counts(ram)[0] > 0
