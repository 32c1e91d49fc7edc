"""Dirty-page logging for guest RAM held in a shared mapping.

The machine process owns guest RAM as one ``MAP_SHARED`` mapping (a file in
``/dev/shm`` or a memfd) that its Unicorn vCPU threads write; the migration
engine asks, round after round, which pages were written since it last asked.
:func:`open_dirty_log` answers with one of two implementations:

``userfaultfd-wp+pagemap-scan`` (Linux >= 6.7)
    The mapping is registered with a userfaultfd in asynchronous
    write-protect mode (``UFFD_FEATURE_WP_ASYNC``): the first write to a
    protected page is resolved by the kernel itself (no handler thread, about
    1 us) and leaves the page marked *written*.  :meth:`DirtyLog.collect`
    reads and re-protects the written pages in one ``PAGEMAP_SCAN`` ioctl on
    ``/proc/self/pagemap``, page table entry by entry under the page table
    lock, so a racing write lands in this collection or the next; a page
    written *during* a scan may be reported by both (the fault is resolved,
    the scan re-protects, the store faults again).  The cost is O(dirty
    pages) plus the page-table walk, about 0.3-0.6 ms per GiB here.

    Observed on Linux 6.18 with shmem (``/dev/shm`` files, memfds, anonymous
    ``MAP_SHARED``; a regular ext4 file mapping too): exactly the written
    4 KiB pages are reported, including writes to never-touched pages, writes
    of the value already there, and writes the kernel makes on the process's
    behalf (``read(2)`` into the mapping).  Shmem transparent huge pages are
    mapped by 4 KiB entries while registered, so the granularity stays 4 KiB.
    Not reported: writes through *another* mapping of the same file (another
    ``mmap`` of the fd, a forked child, another process), which never touch
    this mapping's page tables, and pages discarded with ``MADV_REMOVE`` or a
    hole punch, which read back as zeros without having been written.  One
    log per mapping at a time (a second registration fails with ``EBUSY``).
    Closing the log resets the protection, which costs each page one more
    minor fault on its next write.

``content-compare`` (anywhere)
    Keeps a copy of the whole mapping and reports the pages that differ from
    it.  O(RAM) per collection, in time (about 5 GB/s here: 220 ms per GiB)
    and in memory (a second copy of guest RAM).  It cannot see a write of the
    value already there, and it compares against the content *it* saw, not
    the content the caller copied afterwards: a page changed after
    :meth:`~DirtyLog.collect` returns, copied by the caller, then changed
    back to the collected value before the next collection, is not reported
    again.

Either way, read a reported page's content after ``collect()`` returns.

Pages given a new backing in place (``mmap`` with ``MAP_FIXED``, as an SEV
guest's page conversion does) leave the kernel's log: the new mapping is
not registered.  Replace them inside :meth:`DirtyLog.replacing`, which
holds collections off meanwhile, logs the pages again and reports them
at the next collection (their content changed without a write).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import fcntl
import functools
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import ClassVar, Final, Literal, Self

import attrs
import numpy as np
import numpy.typing as npt

from vmmig.errors import HostRequirementError, PlatformError


__all__ = ["DirtyLog", "PageIndices", "Probe", "open_dirty_log", "probe"]

logger = logging.getLogger(__name__)

#: Sorted page indices relative to the start of the mapping.
PageIndices = npt.NDArray[np.uint64]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- Kernel ABI (include/uapi/linux/userfaultfd.h, fs.h); Debian 12's headers predate it.

_SYS_USERFAULTFD: Final = 323  # x86-64
_UFFD_USER_MODE_ONLY: Final = 1
_USERFAULTFD_DEVICE: Final = "/dev/userfaultfd"

_UFFD_API: Final = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED: Final = 1 << 13
_UFFD_FEATURE_WP_ASYNC: Final = 1 << 15
_UFFDIO_REGISTER_MODE_WP: Final = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP: Final = 1 << 0

_PM_SCAN_WP_MATCHING: Final = 1 << 0
_PM_SCAN_CHECK_WPASYNC: Final = 1 << 1
_PAGE_IS_WRITTEN: Final = 1 << 1


class _UffdioApi(ctypes.Structure):
    _fields_ = (("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64))


class _UffdioRange(ctypes.Structure):
    _fields_ = (("start", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _UffdioRegister(ctypes.Structure):
    _fields_ = (("range", _UffdioRange), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64))


class _UffdioWriteprotect(ctypes.Structure):
    _fields_ = (("range", _UffdioRange), ("mode", ctypes.c_uint64))


class _PmScanArg(ctypes.Structure):
    _fields_ = tuple((name, ctypes.c_uint64) for name in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask"))


#: ``struct page_region``, the elements of ``pm_scan_arg.vec``.
_PAGE_REGION: Final = np.dtype([("start", np.uint64), ("end", np.uint64),
                                ("categories", np.uint64)])


def _ioc(direction: int, kind: int, number: int, size: int) -> int:
    """Linux's ``_IOC`` (asm-generic/ioctl.h, as on x86-64)."""
    return direction << 30 | size << 16 | kind << 8 | number


def _iowr(kind: int, number: int, struct: type[ctypes.Structure]) -> int:
    """Linux's ``_IOWR``: the argument is read and written by the kernel."""
    return _ioc(3, kind, number, ctypes.sizeof(struct))


_USERFAULTFD_IOC_NEW: Final = _ioc(0, 0xAA, 0x00, 0)
_UFFDIO_API: Final = _iowr(0xAA, 0x3F, _UffdioApi)
_UFFDIO_REGISTER: Final = _iowr(0xAA, 0x00, _UffdioRegister)
_UFFDIO_WRITEPROTECT: Final = _iowr(0xAA, 0x06, _UffdioWriteprotect)
_PAGEMAP_SCAN: Final = _iowr(ord("f"), 16, _PmScanArg)

#: ``page_region`` entries one ``PAGEMAP_SCAN`` returns at most; more runs take more calls.
_REGIONS_PER_SCAN: Final = 4096

#: Bytes the content comparison handles per step (bounds its scratch memory).
_COMPARE_CHUNK: Final = 2 << 20


@attrs.frozen
class Probe:
    """Whether this host and process can log dirty pages with the kernel.

    :param available: userfaultfd asynchronous write-protect and
        ``PAGEMAP_SCAN`` both work here, checked on a shmem mapping.
    :param reason: one line saying what works or, when not available, what is
        missing.
    """

    available: bool
    reason: str


class DirtyLog(abc.ABC):
    """The pages of one mapping written since the previous collection.

    Holds a buffer export of the mapping while open, so the mapping cannot be
    closed or resized under it: :meth:`close` the log first.

    :param buffer: the mapping, writable, its length a multiple of ``page_size``.
    :param page_size: the unit of the reported indices, a multiple of the
        host page size.
    """

    #: Which implementation this is, for reports.
    method: ClassVar[str]

    def __init__(self, buffer: mmap.mmap, page_size: int) -> None:
        if page_size <= 0 or page_size % mmap.PAGESIZE:
            raise ValueError(f"page size {page_size} is not a multiple of the host's "
                             f"{mmap.PAGESIZE}")
        if not len(buffer) or len(buffer) % page_size:
            raise ValueError(f"mapping length {len(buffer)} is not a positive multiple of "
                             f"the page size {page_size}")
        self.page_size = page_size
        self.pages = len(buffer) // page_size
        self._lock = threading.Lock()
        self._closed = False
        # Pages given a new backing since the last collection (see replacing).
        self._replaced: list[PageIndices] = []

    @abc.abstractmethod
    def collect(self) -> PageIndices:
        """Report the pages written since the previous call (or since opening) and re-arm.

        :return: sorted page indices relative to the start of the mapping.
        :raise ValueError: the log is closed.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Stop logging and release the mapping; idempotent."""

    @contextlib.contextmanager
    def replacing(self, first: int, count: int) -> Iterator[None]:
        """Hold the log while pages ``[first, first + count)`` get a new backing in place.

        No collection runs meanwhile; when the block ends without an error
        the pages are logged again and the next collection reports them.
        Nothing to do on a closed log.
        """
        with self._lock:
            yield
            if not self._closed:
                self._rearm(first, count)
                self._replaced.append(np.arange(first, first + count, dtype=np.uint64))

    @abc.abstractmethod
    def _rearm(self, first: int, count: int) -> None:
        """Log pages that have a new mapping again; lock held."""

    def _with_replaced(self, pages: PageIndices) -> PageIndices:
        """``pages`` and the pages replaced since the last collection, sorted; lock held."""
        if not self._replaced:
            return pages
        merged = np.union1d(pages, np.concatenate(self._replaced)).astype(np.uint64)
        self._replaced.clear()
        return merged

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the dirty log is closed")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _open_userfaultfd() -> int:
    """A new userfaultfd, by the syscall or else by ``/dev/userfaultfd``.

    ``UFFD_USER_MODE_ONLY`` lets an unprivileged process use the syscall
    whatever ``vm.unprivileged_userfaultfd`` says.  It only stops kernel-mode
    faults from being *delivered*, and in asynchronous write-protect mode no
    fault is delivered: writes the kernel makes into the mapping are resolved
    and logged like the others.
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY
    fd = _libc.syscall(_SYS_USERFAULTFD, flags)
    if fd >= 0:
        return int(fd)
    refused = os.strerror(ctypes.get_errno())
    try:
        device = os.open(_USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(device, _USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(device)
    except OSError as err:
        raise HostRequirementError(
            f"userfaultfd refused (syscall: {refused}; {_USERFAULTFD_DEVICE}: {err.strerror})"
        ) from err


def _no_async_wp(problem: str) -> HostRequirementError:
    return HostRequirementError(f"userfaultfd lacks asynchronous write-protect ({problem}); "
                                f"Linux >= 6.7 has it, this is {os.uname().release}")


def _enable_async_wp(uffd: int) -> None:
    """Ask for write faults resolved by the kernel, unpopulated pages included."""
    wanted = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED
    api = _UffdioApi(api=_UFFD_API, features=wanted)
    try:
        fcntl.ioctl(uffd, _UFFDIO_API, api)
    except OSError as err:
        raise _no_async_wp(f"{err.strerror}") from err
    if api.features & wanted != wanted:
        raise _no_async_wp(f"features {api.features:#x}")


def _protect(uffd: int, start: int, length: int) -> None:
    """Register ``[start, start + length)`` for write-protect and protect all of it."""
    span = _UffdioRange(start=start, len=length)
    try:
        fcntl.ioctl(uffd, _UFFDIO_REGISTER, _UffdioRegister(range=span,
                                                            mode=_UFFDIO_REGISTER_MODE_WP))
        fcntl.ioctl(uffd, _UFFDIO_WRITEPROTECT,
                    _UffdioWriteprotect(range=span, mode=_UFFDIO_WRITEPROTECT_MODE_WP))
    except OSError as err:
        raise HostRequirementError(
            f"userfaultfd cannot write-protect this mapping ({err.strerror})") from err


def _arm(start: int, length: int) -> int:
    """Open a userfaultfd logging writes to ``[start, start + length)``; return it."""
    uffd = _open_userfaultfd()
    try:
        _enable_async_wp(uffd)
        _protect(uffd, start, length)
    except BaseException:
        os.close(uffd)
        raise
    return uffd


def _expand(starts: npt.NDArray[np.intp], ends: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """Every index of the sorted, disjoint ranges ``[starts[i], ends[i])``, in order."""
    lengths = ends - starts
    # Output position j of range i holds starts[i] + (j - first[i]).
    first = np.cumsum(lengths) - lengths
    shifts: npt.NDArray[np.intp] = np.repeat(starts - first, lengths)
    return np.arange(len(shifts)) + shifts


class _UffdWpLog(DirtyLog):
    """The kernel's log: userfaultfd asynchronous write-protect plus ``PAGEMAP_SCAN``."""

    method = "userfaultfd-wp+pagemap-scan"

    def __init__(self, buffer: mmap.mmap, page_size: int) -> None:
        super().__init__(buffer, page_size)
        self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # The export pins the mapping: an unmapped range would silently stop logging,
            # and a new mapping at the same address would be scanned instead.
            self._anchor: ctypes.c_char | None = ctypes.c_char.from_buffer(buffer)
            self._start = ctypes.addressof(self._anchor)
            self._end = self._start + len(buffer)
            self._uffd = _arm(self._start, len(buffer))
        except BaseException:
            os.close(self._pagemap)
            self._anchor = None
            raise
        self._regions = np.zeros(_REGIONS_PER_SCAN, _PAGE_REGION)
        self._scan = _PmScanArg(
            size=ctypes.sizeof(_PmScanArg), flags=_PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC,
            end=self._end, vec=self._regions.ctypes.data, vec_len=_REGIONS_PER_SCAN,
            category_mask=_PAGE_IS_WRITTEN, return_mask=_PAGE_IS_WRITTEN)

    def collect(self) -> PageIndices:
        """Report and re-protect the written pages, one ``PAGEMAP_SCAN`` per 4096 runs.

        :raise PlatformError: the kernel refused the scan.
        """
        with self._lock:
            self._check_open()
            scan = self._scan
            scan.start = self._start
            found: list[npt.NDArray[np.void]] = []
            while True:
                try:
                    count = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, scan)
                except OSError as err:
                    raise PlatformError(f"PAGEMAP_SCAN failed: {err.strerror}") from err
                found.append(self._regions[:count].copy())
                # A full vec stops the walk early; the rest is scanned from walk_end.
                if scan.walk_end >= self._end:
                    break
                scan.start = scan.walk_end
        regions = np.concatenate(found)
        pages = _expand(((regions["start"] - self._start) // mmap.PAGESIZE).astype(np.intp),
                        ((regions["end"] - self._start) // mmap.PAGESIZE).astype(np.intp))
        if self.page_size != mmap.PAGESIZE:
            pages = np.unique(pages // (self.page_size // mmap.PAGESIZE))
        with self._lock:
            return self._with_replaced(pages.astype(np.uint64))

    def _rearm(self, first: int, count: int) -> None:
        """Register and write-protect the new mapping of the pages."""
        _protect(self._uffd, self._start + first * self.page_size, count * self.page_size)

    def close(self) -> None:
        """Close the userfaultfd, which unregisters the mapping, and release it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._pagemap)
            os.close(self._uffd)
            self._anchor = None


class _CompareLog(DirtyLog):
    """The fallback: compare the mapping against a copy, chunk by chunk, with numpy."""

    method = "content-compare"

    def __init__(self, buffer: mmap.mmap, page_size: int) -> None:
        super().__init__(buffer, page_size)
        self._live = np.frombuffer(buffer, np.uint64).reshape(self.pages, -1)
        self._copy = self._live.copy()
        self._chunk_pages = max(1, _COMPARE_CHUNK // page_size)
        self._differs = np.empty((self._chunk_pages, self._live.shape[1]), np.bool_)

    def collect(self) -> PageIndices:
        """Report the pages that differ from the copy and update the copy for them."""
        with self._lock:
            self._check_open()
            found = [np.empty(0, np.intp)]
            for first in range(0, self.pages, self._chunk_pages):
                live = self._live[first:first + self._chunk_pages]
                copy = self._copy[first:first + self._chunk_pages]
                differs = self._differs[:len(live)]
                np.not_equal(live, copy, out=differs)
                changed = np.flatnonzero(differs.any(axis=1))
                copy[changed] = live[changed]
                found.append(changed + first)
            return self._with_replaced(np.concatenate(found).astype(np.uint64))

    def _rearm(self, first: int, count: int) -> None:
        """Nothing to register: the comparison reads through the mapping, whatever backs it."""

    def close(self) -> None:
        """Drop the copy and release the mapping."""
        with self._lock:
            self._closed = True
            empty = np.empty((0, 0), np.uint64)
            self._live = self._copy = empty


def probe() -> Probe:
    """Check that the kernel method works here, on a small shmem mapping.

    Opens a userfaultfd, enables asynchronous write-protect, registers and
    protects an anonymous ``MAP_SHARED`` (shmem) mapping, writes one page and
    checks that ``PAGEMAP_SCAN`` reports exactly that page, then nothing.
    """
    test_pages = 4
    with mmap.mmap(-1, test_pages * mmap.PAGESIZE) as mapping:
        try:
            log = _UffdWpLog(mapping, mmap.PAGESIZE)
        except (PlatformError, OSError) as err:
            return Probe(available=False, reason=str(err))
        with log:
            try:
                mapping[2 * mmap.PAGESIZE] = 1
                first, second = log.collect().tolist(), log.collect().tolist()
            except PlatformError as err:
                return Probe(available=False, reason=f"{err} (Linux >= 6.7 has PAGEMAP_SCAN, "
                                                      f"this is {os.uname().release})")
    if first != [2] or second:
        return Probe(available=False,
                     reason=f"PAGEMAP_SCAN reported pages {first} then {second} for a write "
                            "to page 2")
    return Probe(available=True,
                 reason="userfaultfd asynchronous write-protect and PAGEMAP_SCAN work")


@functools.cache
def _announce_fallback(reason: str) -> None:
    logger.warning("dirty pages are found by comparing guest RAM with a copy (O(RAM) per "
                   "round, twice the memory): the kernel method is unavailable: %s", reason)


def open_dirty_log(buffer: mmap.mmap, *, page_size: int = 4096,
                   method: Literal["auto", "kernel", "compare"] = "auto") -> DirtyLog:
    """Start logging the pages written to ``buffer``.

    :param buffer: the guest RAM mapping (shmem: a ``/dev/shm`` file or memfd).
    :param page_size: the unit of the reported page indices.
    :param method: ``"kernel"`` for userfaultfd + ``PAGEMAP_SCAN``,
        ``"compare"`` for the content comparison, ``"auto"`` for the kernel's
        when :func:`probe` says it works, otherwise the comparison, with a
        warning (logged once per process and reason).
    :raise HostRequirementError: ``"kernel"`` and the kernel method does not
        work here, or the kernel cannot protect this mapping (one that already
        has a log, for one).
    :raise ValueError: a page size or mapping length the log cannot use.
    """
    if method == "compare":
        return _CompareLog(buffer, page_size)
    found = probe()
    if found.available:
        return _UffdWpLog(buffer, page_size)
    if method == "kernel":
        raise HostRequirementError(f"kernel dirty-page logging is unavailable: {found.reason}")
    _announce_fallback(found.reason)
    return _CompareLog(buffer, page_size)
