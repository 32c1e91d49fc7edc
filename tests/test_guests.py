"""The test guests: how they are built, the a-b rule, and how they behave in QEMU."""

from __future__ import annotations

import contextlib
import json
import mmap
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmmig.errors import HostRequirementError, IntegrityError, PlatformError
from vmmig.guests import (
    AB_START,
    INFO_ADDR,
    PAGE_SIZE,
    ab_passes,
    ab_region,
    build_from_source,
    build_image,
    check_ab,
    default_cache_dir,
)
from vmmig.guests.build import guest_source
from vmmig.platforms.qemu.host import kvm_status


GUESTS = ["ab", "idle"]


class TestBuild:
    """Guest images are built from the shipped sources and cached by their hash."""

    @pytest.mark.parametrize("name", GUESTS)
    def test_image_is_one_boot_sector(self, name, tmp_path):
        """Each guest builds into exactly one 512-byte sector ending with 55 aa."""
        image = build_image(name, tmp_path).read_bytes()
        assert len(image) == 512
        assert image[-2:] == b"\x55\xaa"

    def test_second_build_is_the_cached_image(self, tmp_path, monkeypatch):
        """A second build returns the cached image without assembling again."""
        first = build_image("ab", tmp_path)
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
        assert build_image("ab", tmp_path) == first

    @pytest.mark.parametrize("name", GUESTS)
    def test_deleted_image_is_rebuilt_identically(self, name, tmp_path):
        """Deleting the cached image rebuilds it, byte for byte the same."""
        path = build_image(name, tmp_path)
        before = path.read_bytes()
        path.unlink()
        assert build_image(name, tmp_path) == path
        assert path.read_bytes() == before

    def test_changed_source_gets_a_new_entry(self, tmp_path):
        """A changed source is built into a new cache entry beside the old one."""
        original = build_image("ab", tmp_path)
        source = guest_source("ab") + b"\n# changed\n"
        changed = build_from_source(source, stem="ab", cache_dir=tmp_path)
        assert changed != original
        assert changed.is_file()
        assert original.is_file()

    def test_default_cache_follows_xdg(self, tmp_path, monkeypatch):
        """The default cache lives under $XDG_CACHE_HOME when it is set."""
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        assert default_cache_dir() == tmp_path / "vmmig" / "guests"

    def test_missing_assembler_is_a_host_requirement(self, tmp_path, monkeypatch):
        """Without GNU as the build fails with a HostRequirementError naming binutils."""
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
        with pytest.raises(HostRequirementError, match=r"GNU as \(package binutils\)"):
            build_image("ab", tmp_path)

    def test_bad_source_is_a_platform_error(self, tmp_path):
        """Source that does not assemble fails with the assembler's message."""
        with pytest.raises(PlatformError, match="as failed"):
            build_from_source(b"not an instruction\n", stem="bad", cache_dir=tmp_path)

    def test_oversized_sector_is_refused(self, tmp_path):
        """Source that does not make exactly one boot sector is refused."""
        with pytest.raises(PlatformError, match="512-byte boot sector"):
            build_from_source(b".fill 600, 1, 0\n", stem="big", cache_dir=tmp_path)


def ab_memory(column: list[int], *, publish: bool = True) -> bytearray:
    """Guest RAM whose a-b region holds ``column`` as byte 0 of its pages."""
    memory = bytearray(AB_START + len(column) * PAGE_SIZE)
    if publish:
        struct.pack_into("<II", memory, INFO_ADDR, AB_START, len(memory))
    for i, value in enumerate(column):
        memory[AB_START + i * PAGE_SIZE] = value
    return memory


def gpa(page: int) -> int:
    """The GPA of the region's page number ``page``."""
    return AB_START + page * PAGE_SIZE


class TestAbRule:
    """check_ab applies QEMU's check_guests_ram rule to byte 0 of each page."""

    def test_all_equal_holds(self):
        """Pages that all hold the same byte satisfy the rule."""
        result = check_ab(ab_memory([7] * 64))
        assert result.ok
        assert (result.pages, result.edges, result.bad, result.first_bad) == (64, 0, 0, None)

    def test_one_edge_holds(self):
        """One step down by one, where the incrementer stopped, satisfies the rule."""
        result = check_ab(ab_memory([8] * 10 + [7] * 54))
        assert result.ok
        assert result.edges == 1
        assert f"{gpa(10):#x}" in result.detail

    def test_edge_wraps_around(self):
        """The edge between 0x00 and 0xff (a wrapped increment) counts as an edge."""
        assert check_ab(ab_memory([0x00] * 3 + [0xFF] * 5)).ok

    def test_two_edges_break(self):
        """A second edge breaks the rule and is the first bad page."""
        result = check_ab(ab_memory([9] * 5 + [8] * 5 + [7] * 5))
        assert not result.ok
        assert result.edges == 2
        assert result.first_bad == gpa(10)

    def test_flipped_byte_breaks_at_its_page(self):
        """A single corrupted page breaks the rule and is reported by its GPA."""
        column = [5] * 40
        column[17] = 0x55
        result = check_ab(ab_memory(column))
        assert not result.ok
        assert result.bad == 2
        assert result.first_bad == gpa(17)
        assert f"{gpa(17):#x}" in result.detail

    def test_upward_step_is_not_an_edge(self):
        """A step up by one is not the incrementer's mark and breaks the rule."""
        result = check_ab(ab_memory([7] * 4 + [8] * 4))
        assert (result.ok, result.edges, result.bad, result.first_bad) == (False, 0, 1, gpa(4))

    def test_explicit_region_is_checked_alone(self):
        """An explicit region is checked on its own, whatever the guest published."""
        memory = ab_memory([1] * 4 + [9] * 4, publish=False)
        assert check_ab(memory, region=(gpa(4), gpa(8))).ok
        assert not check_ab(memory, region=(gpa(0), gpa(8))).ok

    def test_misaligned_region_is_refused(self):
        """An explicit region that is not whole pages of the memory raises ValueError."""
        memory = ab_memory([0] * 4)
        with pytest.raises(ValueError, match="whole pages"):
            check_ab(memory, region=(gpa(0) + 1, gpa(4)))
        with pytest.raises(ValueError, match="whole pages"):
            check_ab(memory, region=(gpa(0), gpa(5)))

    def test_works_on_a_mapped_file(self, tmp_path):
        """The checker reads a memoryview of an mmap, as of a guest RAM file."""
        ram = tmp_path / "ram"
        ram.write_bytes(ab_memory([3] * 7 + [2] * 9))
        with ram.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            result = check_ab(memoryview(mm))
        assert (result.ok, result.pages, result.edges) == (True, 16, 1)


class TestAbRegion:
    """The region to check is the one the guest published at 0x500, validated."""

    def test_reads_the_published_bounds(self):
        """The bounds are those the guest stored at 0x500."""
        assert ab_region(ab_memory([0] * 8)) == (AB_START, gpa(8))

    def test_unbooted_guest_has_no_region(self):
        """Zeroed memory (the guest has not run) has no region."""
        with pytest.raises(IntegrityError, match="not booted"):
            ab_region(ab_memory([0] * 8, publish=False))

    def test_end_must_be_page_aligned(self):
        """An end that is not page aligned is refused."""
        memory = ab_memory([0] * 8)
        struct.pack_into("<I", memory, INFO_ADDR + 4, gpa(4) + 12)
        with pytest.raises(IntegrityError, match="page-aligned"):
            ab_region(memory)

    def test_end_must_be_in_memory(self):
        """An end beyond the memory given is refused."""
        memory = ab_memory([0] * 8)
        struct.pack_into("<I", memory, INFO_ADDR + 4, gpa(9))
        with pytest.raises(IntegrityError, match="guest memory of"):
            ab_region(memory)

    def test_tiny_memory_is_refused(self):
        """Memory too small to hold the published block is refused."""
        with pytest.raises(IntegrityError, match="too small"):
            ab_region(bytes(16))

    def test_check_without_region_needs_one_published(self):
        """check_ab without a region raises when the guest published none."""
        with pytest.raises(IntegrityError):
            check_ab(ab_memory([0] * 4, publish=False))


# --- Real QEMU -------------------------------------------------------------

RAM_SIZE = 64 << 20
DEADLINE = 60.0


ACCELS = [
    pytest.param("kvm", marks=pytest.mark.skipif(not kvm_status()[0], reason=kvm_status()[1])),
    "tcg",
]


class Vm:
    """One QEMU running a guest image, with its serial output, RAM file and QMP."""

    def __init__(self, workdir: Path, proc: subprocess.Popen[bytes]) -> None:
        self.workdir = workdir
        self.proc = proc
        self.serial = workdir / "serial"
        self.ram = workdir / "ram"
        self.qmp_path = workdir / "qmp"

    def wait_until(self, what: str, predicate: Callable[[], bool]) -> None:
        """Poll ``predicate`` until true; fail on QEMU's exit or the deadline."""
        deadline = time.monotonic() + DEADLINE
        while not predicate():
            if self.proc.poll() is not None:
                stderr = self.proc.communicate()[1].decode(errors="replace")
                pytest.fail(f"QEMU exited ({self.proc.returncode}) waiting for {what}: {stderr}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {DEADLINE:.0f} s; serial: {self.serial_text()!r}")
            time.sleep(0.05)

    def serial_text(self) -> bytes:
        """All the guest wrote to COM1 so far."""
        return self.serial.read_bytes() if self.serial.exists() else b""

    def qmp(self, command: str) -> Any:
        """Run one QMP command over a fresh connection and return its result."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(DEADLINE)
            sock.connect(str(self.qmp_path))
            with sock.makefile("rwb") as stream:
                stream.readline()  # the greeting
                result: Any = None
                for execute in ("qmp_capabilities", command):
                    stream.write(json.dumps({"execute": execute}).encode() + b"\n")
                    stream.flush()
                    reply = json.loads(stream.readline())
                    while "event" in reply:
                        reply = json.loads(stream.readline())
                    assert "return" in reply, reply
                    result = reply["return"]
                return result


@contextlib.contextmanager
def boot(guest: str, accel: str, workdir: Path) -> Iterator[Vm]:
    """Boot a guest image in QEMU from its own copy of the disk; kill QEMU on exit."""
    disk = workdir / "disk.img"
    shutil.copyfile(build_image(guest, workdir / "cache"), disk)
    cpu = "qemu64,kvmclock=off" if accel == "kvm" else "qemu64"
    argv = [
        "qemu-system-x86_64",
        "-accel", accel, "-cpu", cpu, "-m", "64M",
        "-machine", "pc,memory-backend=ram",
        "-object", f"memory-backend-file,id=ram,size=64M,mem-path={workdir / 'ram'},share=on",
        "-display", "none", "-nodefaults", "-no-reboot",
        "-drive", f"file={disk},format=raw,if=ide",
        "-serial", f"file:{workdir / 'serial'}",
        "-qmp", f"unix:{workdir / 'qmp'},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield Vm(workdir, proc)
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.qemu
@pytest.mark.parametrize("accel", ACCELS)
class TestInQemu:
    """The guests boot in real QEMU, under KVM where usable and always under TCG."""

    def test_ab_guest_dirties_memory_by_the_rule(self, accel, tmp_path):
        """The a-b guest says A then B, keeps changing RAM, and stops consistent."""
        with boot("ab", accel, tmp_path) as vm:
            vm.wait_until("'A' on COM1", lambda: b"A" in vm.serial_text())
            vm.wait_until("'B' after 'A'", lambda: b"B" in vm.serial_text().partition(b"A")[2])
            with vm.ram.open("r+b") as f, mmap.mmap(f.fileno(), RAM_SIZE) as ram:
                assert ab_region(ram) == (AB_START, RAM_SIZE)
                page = AB_START + 100 * PAGE_SIZE
                first = ram[page]
                vm.wait_until("byte 0 of a page to change", lambda: ram[page] != first)
                assert ab_passes(ram) >= 64

                vm.qmp("stop")
                assert vm.qmp("query-status")["status"] == "paused"
                result = check_ab(ram)
                assert result.ok, result.detail
                assert result.pages == (RAM_SIZE - AB_START) // PAGE_SIZE

    def test_idle_guest_boots_and_halts(self, accel, tmp_path):
        """The idle guest says A and nothing more, and can be stopped."""
        with boot("idle", accel, tmp_path) as vm:
            vm.wait_until("'A' on COM1", lambda: b"A" in vm.serial_text())
            vm.qmp("stop")
            assert vm.serial_text() == b"A"
