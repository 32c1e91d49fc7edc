"""Dirty-page logging of a shmem mapping: the kernel's method and the content comparison."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_R8, UC_X86_REG_RCX

from vmmig.errors import HostRequirementError
from vmmig.platforms.emu import dirtylog
from vmmig.platforms.emu.dirtylog import DirtyLog, Probe, open_dirty_log, probe


PAGE = 4096
RAM_SIZE = 64 << 20
PAGES = RAM_SIZE // PAGE
KERNEL = "userfaultfd-wp+pagemap-scan"
COMPARE = "content-compare"

HOST_PROBE = probe()
needs_kernel = pytest.mark.skipif(not HOST_PROBE.available, reason=HOST_PROBE.reason)
METHODS = [pytest.param("kernel", marks=needs_kernel), "compare"]


def shmem(size: int = RAM_SIZE, backing: str = "memfd") -> mmap.mmap:
    """A MAP_SHARED mapping of a new memfd or /dev/shm file, as the machine's RAM is."""
    if backing == "memfd":
        fd = os.memfd_create("vmmig-test-ram")
    else:
        fd, path = tempfile.mkstemp(dir="/dev/shm")
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def half_populated() -> mmap.mmap:
    """64 MiB of shmem whose first half has been written (populated) and second half not."""
    ram = shmem()
    ram[:RAM_SIZE // 2] = b"\xa5" * (RAM_SIZE // 2)
    return ram


@pytest.fixture
def ram() -> mmap.mmap:
    return half_populated()


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    """Let a Python writer thread and the collecting thread interleave finely."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def fresh_announcement() -> Iterator[None]:
    dirtylog._announce_fallback.cache_clear()
    yield
    dirtylog._announce_fallback.cache_clear()


def unavailable(reason: str) -> Probe:
    return Probe(available=False, reason=reason)


class TestProbe:
    def test_available_on_linux_6_7_or_newer(self):
        """On Linux >= 6.7 the probe finds the kernel method, so its tests are not skipped."""
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
        if (major, minor) < (6, 7):
            pytest.skip(f"Linux {os.uname().release} predates PAGEMAP_SCAN")
        assert HOST_PROBE.available, HOST_PROBE.reason

    def test_ioctl_numbers_are_the_kernels(self):
        """The _IOWR-computed numbers equal those gcc computes from the kernel's headers."""
        assert dirtylog._UFFDIO_API == 0xC018AA3F
        assert dirtylog._UFFDIO_REGISTER == 0xC020AA00
        assert dirtylog._UFFDIO_WRITEPROTECT == 0xC018AA06
        assert dirtylog._PAGEMAP_SCAN == 0xC0606610
        assert dirtylog._USERFAULTFD_IOC_NEW == 0xAA00
        assert dirtylog._PAGE_REGION.itemsize == 24


class TestOpen:
    @pytest.mark.parametrize("method", METHODS)
    def test_a_fresh_log_collects_nothing(self, ram, method):
        """Nothing was written since opening, so the first collection is empty."""
        with open_dirty_log(ram, method=method) as log:
            assert log.collect().tolist() == []

    @pytest.mark.parametrize(("method", "name"), [
        pytest.param("kernel", KERNEL, marks=needs_kernel),
        pytest.param("auto", KERNEL, marks=needs_kernel),
        ("compare", COMPARE),
    ])
    def test_method_names_the_implementation(self, ram, method, name):
        """``method`` says which implementation logs; "auto" picks the kernel's where it works."""
        with open_dirty_log(ram, method=method) as log:
            assert log.method == name

    def test_kernel_refuses_when_unavailable(self, ram, monkeypatch):
        """Asking for the kernel method where it is missing raises, naming the reason."""
        monkeypatch.setattr(dirtylog, "probe", lambda: unavailable("no PAGEMAP_SCAN here"))
        with pytest.raises(HostRequirementError, match=r"unavailable: no PAGEMAP_SCAN here$"):
            open_dirty_log(ram, method="kernel")

    def test_auto_falls_back_and_announces_it_once(self, ram, monkeypatch, caplog,
                                                   fresh_announcement):
        """Where the kernel method is missing, "auto" compares contents and warns once, why."""
        monkeypatch.setattr(dirtylog, "probe", lambda: unavailable("no PAGEMAP_SCAN here"))
        with caplog.at_level(logging.WARNING, logger=dirtylog.__name__):
            for _ in range(2):
                with open_dirty_log(ram) as log:
                    assert log.method == COMPARE
        assert len(caplog.records) == 1
        assert "O(RAM)" in caplog.text
        assert "no PAGEMAP_SCAN here" in caplog.text

    @pytest.mark.parametrize("method", METHODS)
    def test_the_mapping_is_held_until_the_log_closes(self, method):
        """An open log keeps the mapping from being closed; closing the log releases it."""
        ram = shmem(16 * PAGE)
        log = open_dirty_log(ram, method=method)
        with pytest.raises(BufferError):
            ram.close()
        log.close()
        log.close()
        ram.close()
        with pytest.raises(ValueError, match="closed"):
            log.collect()

    @pytest.mark.parametrize("method", METHODS)
    @pytest.mark.parametrize(("size", "page_size"), [(16 * PAGE, 1000), (16 * PAGE, 0),
                                                     (3 * PAGE, 2 * PAGE)])
    def test_refuses_sizes_it_cannot_log(self, method, size, page_size):
        """A page size not a multiple of the host's, or a mapping not whole pages, is refused."""
        with pytest.raises(ValueError, match="multiple"):
            open_dirty_log(shmem(size), page_size=page_size, method=method)


class TestCollect:
    @pytest.mark.parametrize("method", METHODS)
    def test_pages_are_relative_to_the_mapping(self, method):
        """Indices count from the mapping's first page, not the file's or the address space's."""
        fd = os.memfd_create("vmmig-test-ram")
        os.ftruncate(fd, 64 * PAGE)
        ram = mmap.mmap(fd, 32 * PAGE, offset=16 * PAGE)
        os.close(fd)
        with open_dirty_log(ram, method=method) as log:
            ram[0] = ram[-1] = 1
            assert log.collect().tolist() == [0, 31]

    @pytest.mark.parametrize("method", METHODS)
    def test_a_collection_rearms(self, ram, method):
        """A page is reported once per write: the next collection is empty until it is rewritten."""
        with open_dirty_log(ram, method=method) as log:
            ram[5 * PAGE + 9] = 1
            ram[PAGES // 2 * PAGE:(PAGES // 2 + 3) * PAGE] = b"\x01" * 3 * PAGE
            assert log.collect().tolist() == [5, PAGES // 2, PAGES // 2 + 1, PAGES // 2 + 2]
            assert log.collect().tolist() == []
            ram[5 * PAGE] = 2
            assert log.collect().tolist() == [5]

    @pytest.mark.parametrize("method", METHODS)
    def test_larger_pages_group_host_pages(self, ram, method):
        """With a 16 KiB page size, writes to host pages 0, 3, 4 and 9 are pages 0, 1 and 2."""
        with open_dirty_log(ram, page_size=4 * PAGE, method=method) as log:
            for host_page in (0, 3, 4, 9):
                ram[host_page * PAGE] = 7
            assert log.collect().tolist() == [0, 1, 2]

    @pytest.mark.parametrize("method", METHODS)
    def test_more_runs_than_one_scan_returns_are_all_collected(self, ram, method):
        """Every other page written, more runs than one PAGEMAP_SCAN holds: all are reported."""
        runs = 2 * dirtylog._REGIONS_PER_SCAN
        assert 2 * runs <= PAGES
        with open_dirty_log(ram, method=method) as log:
            for page in range(0, 2 * runs, 2):
                ram[page * PAGE] = 0x5A
            assert log.collect().tolist() == list(range(0, 2 * runs, 2))


@pytest.fixture(scope="class", params=METHODS)
def ram_and_log(request: pytest.FixtureRequest) -> Iterator[tuple[mmap.mmap, DirtyLog]]:
    ram = half_populated()
    with open_dirty_log(ram, method=request.param) as log:
        yield ram, log


page_writes = st.lists(st.tuples(st.integers(0, PAGES - 1),   # page
                                 st.integers(0, PAGE - 1),    # offset in the page
                                 st.none() | st.integers(0, 255)),  # None: rewrite what is there
                       max_size=40)


class TestWrittenPagesProperty:
    @settings(max_examples=40, deadline=None)
    @given(writes=page_writes)
    def test_exactly_the_written_pages_are_reported(self, ram_and_log, writes):
        """Kernel: exactly the written pages, same-value writes included; compare: the changed ones.

        The kernel logs writes, so rewriting the byte already there counts and
        a quiet page never shows up (observed exact, 4 KiB granularity, on
        shmem).  The comparison sees contents, so it reports exactly the pages
        whose bytes differ and cannot see same-value writes.
        """
        ram, log = ram_and_log
        log.collect()  # whatever an earlier (failed or shrunk) example left
        before = {page: ram[page * PAGE:(page + 1) * PAGE] for page, _, _ in writes}
        for page, offset, value in writes:
            at = page * PAGE + offset
            ram[at] = ram[at] if value is None else value
        reported = set(log.collect().tolist())
        written = set(before)
        if log.method == KERNEL:
            assert reported == written
        else:
            assert reported == {page for page in written
                                if ram[page * PAGE:(page + 1) * PAGE] != before[page]}


class TestShmemBackings:
    @needs_kernel
    @pytest.mark.parametrize("backing", ["memfd", "/dev/shm"])
    def test_kernel_logs_writes_to_either_shmem_backing(self, backing):
        """A memfd and a /dev/shm file mapping are logged alike, touched or not before."""
        ram = shmem(backing=backing)
        ram[:PAGE] = b"\x01" * PAGE
        with open_dirty_log(ram, method="kernel") as log:
            ram[0] = ram[(PAGES - 1) * PAGE] = 2
            assert log.collect().tolist() == [0, PAGES - 1]

    @pytest.mark.parametrize(("method", "seen"), [
        pytest.param("kernel", False, marks=needs_kernel), ("compare", True)])
    def test_writes_through_another_mapping_of_the_file(self, method, seen):
        """Kernel: not logged (another mapping has its own page tables); compare: seen."""
        fd = os.memfd_create("vmmig-test-ram")
        os.ftruncate(fd, 16 * PAGE)
        ram, other = mmap.mmap(fd, 16 * PAGE), mmap.mmap(fd, 16 * PAGE)
        os.close(fd)
        with open_dirty_log(ram, method=method) as log:
            other[3 * PAGE] = 9
            assert ram[3 * PAGE] == 9
            assert log.collect().tolist() == ([3] if seen else [])


def race(log: DirtyLog, ram: mmap.mmap, first: Callable[[], None],
         then: Callable[[], None]) -> list[np.ndarray]:
    """Write with ``first`` then ``then`` in a thread while collecting; return the collections.

    Like the migration engine, copies each collection's pages to a
    "destination" after it returns, and checks that after a last collection
    the destination equals RAM.  The thread waits between ``first`` and
    ``then`` until one collection has run, so that at least one collection
    precedes the last; ``then`` races with the collections.
    """
    live = np.frombuffer(ram, np.uint8).reshape(-1, PAGE)
    destination = live.copy()
    halfway, resume = threading.Event(), threading.Event()

    def writer() -> None:
        first()
        halfway.set()
        resume.wait()
        then()

    collected = []
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive():
            paused = halfway.is_set()
            collected.append(log.collect())
            destination[collected[-1]] = live[collected[-1]]
            if paused:
                resume.set()
    finally:
        resume.set()
        thread.join()
    collected.append(log.collect())
    destination[collected[-1]] = live[collected[-1]]
    assert np.array_equal(destination, live)
    return collected


@pytest.mark.usefixtures("fast_thread_switching")
class TestConcurrentWriter:
    @pytest.mark.parametrize("method", METHODS)
    def test_no_write_racing_with_collections_is_lost(self, ram, method):
        """A thread writes pages while collections run: their union has every page it wrote.

        Every write stores a new value (the comparison sees them all) and a
        copy of the collected pages converges to RAM.
        """
        sequence = np.random.default_rng(7).integers(0, PAGES, 400_000)
        words = np.frombuffer(ram, np.uint64)

        def write(numbers: range) -> None:
            for number in numbers:
                words[int(sequence[number]) * (PAGE // 8) + number % (PAGE // 8)] = number + 1

        half = len(sequence) // 2
        with open_dirty_log(ram, method=method) as log:
            collected = race(log, ram, lambda: write(range(half)),
                             lambda: write(range(half, len(sequence))))
        union = set(np.concatenate(collected).tolist())
        if method == "kernel":
            assert union == set(sequence.tolist())
        else:
            assert union >= set(sequence.tolist())


GUEST_RAM = 0x1000_0000
GUEST_CODE = 0x1000


def store_loop(page_mask: int, page_shift: int, spin: int = 1) -> bytes:
    """x86-64: while rcx != r8: store rcx at RAM + ((rcx & page_mask) << page_shift); rcx -= 1.

    Each store is followed by ``spin`` iterations of an empty loop, to pace it.
    """
    body = bytes.fromhex(
        "4889c8"                                   # mov rax, rcx
        "25" + struct.pack("<I", page_mask).hex()  # and eax, page_mask
        + "48c1e0" + f"{page_shift:02x}"           # shl rax, page_shift
        + "48890c03"                               # mov [rbx+rax], rcx
        "ba" + struct.pack("<I", spin).hex()       # mov edx, spin
        + "ffca75fc"                               # 1: dec edx; jnz 1b
        "48ffc9"                                   # dec rcx
        "4c39c1")                                  # cmp rcx, r8
    jump_back = struct.pack("<b", -(len(body) + 2))
    return (b"\x48\xbb" + struct.pack("<Q", GUEST_RAM)  # mov rbx, GUEST_RAM
            + body + b"\x75" + jump_back)               # jne body


class Vcpu:
    """A Unicorn x86-64 vCPU whose guest RAM is the shmem mapping itself."""

    def __init__(self, ram: mmap.mmap, code: bytes) -> None:
        self._anchor = ctypes.c_char.from_buffer(ram)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map_ptr(GUEST_RAM, len(ram), UC_PROT_ALL, ctypes.addressof(self._anchor))
        self.uc.mem_map(GUEST_CODE, PAGE)
        self.uc.mem_write(GUEST_CODE, code)
        self.end = GUEST_CODE + len(code)

    def run(self, first: int, last: int) -> None:
        """Run the store loop for rcx = first down to last + 1."""
        self.uc.reg_write(UC_X86_REG_RCX, first)
        self.uc.reg_write(UC_X86_REG_R8, last)
        self.uc.emu_start(GUEST_CODE, self.end)

    def release(self) -> None:
        del self.uc
        del self._anchor


class TestUnicornGuest:
    @pytest.mark.parametrize("method", METHODS)
    def test_guest_stores_are_logged(self, ram, method):
        """Stores by translated guest code are host writes into the mapping: they are logged."""
        vcpu = Vcpu(ram, store_loop(page_mask=7, page_shift=16))
        with open_dirty_log(ram, method=method) as log:
            vcpu.run(5, 0)  # stores to pages 16 * (rcx & 7) for rcx = 5..1
            assert log.collect().tolist() == [16, 32, 48, 64, 80]
            assert ram[80 * PAGE] == 5
        vcpu.release()

    @pytest.mark.parametrize("method", METHODS)
    def test_a_running_vcpu_loses_no_write_to_collections(self, ram, method):
        """A vCPU thread stores once to every page while the host collects; the copy converges.

        One store per page makes a lost write permanent: a re-arm that is not
        atomic with the scan fails this test.  A page stored to during a scan
        may be reported by that collection and again by the next (observed with
        the kernel method: the write fault is resolved, the scan re-protects,
        the store faults again), never by neither.
        """
        vcpu = Vcpu(ram, store_loop(page_mask=PAGES - 1, page_shift=12, spin=3000))
        with open_dirty_log(ram, method=method) as log:
            collected = race(log, ram, lambda: vcpu.run(PAGES, PAGES // 2),
                             lambda: vcpu.run(PAGES // 2, 0))
        vcpu.release()
        assert set(np.concatenate(collected).tolist()) == set(range(PAGES))
