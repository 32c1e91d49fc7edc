"""The plain page path: batches of guest pages read from and written to guest RAM.

A ``PAGES`` frame's payload for ``plain`` is::

    u32 count   u32 zero_count   u64 gpa[count]   page[count - zero_count]

The first ``zero_count`` GPAs are zero pages, sent without contents (QEMU's
"duplicate" pages); the others are followed by their 4 KiB contents in the
same order.  Reading and writing use numpy fancy indexing over a view of
the whole RAM, into preallocated buffers: no per-page Python work and no
allocation per batch on the data path.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

import numpy as np

from vmmig.channel.frames import ProtocolError


__all__ = ["BATCH_PAGES", "PAGE", "PageBatcher", "apply_batch", "prefault", "ram_pages"]

PAGE: Final = 4096
#: Pages per frame: large enough to amortize a frame, small enough to pipeline.
BATCH_PAGES: Final = 256
_COUNTS = struct.Struct("<II")
#: Linux 5.14's madvise advice; Python 3.11's mmap module does not name it yet.
MADV_POPULATE_WRITE: Final = 23


def prefault(ram: mmap.mmap) -> None:
    """Fault in every page of a writable mapping now rather than page by page.

    First-touch faults cap writes into fresh memory near 1-2 GB/s; a target
    prefaults its RAM before the stream arrives.
    """
    ram.madvise(MADV_POPULATE_WRITE)


def ram_pages(ram: object, *, writable: bool = False) -> np.ndarray:
    """A (pages, 4096) uint8 view of guest RAM (an mmap or other buffer), without copying."""
    view: np.ndarray = np.frombuffer(ram, dtype=np.uint8)  # type: ignore[call-overload]
    if writable and not view.flags.writeable:
        raise ValueError("guest RAM mapping is read-only")
    return view.reshape(-1, PAGE)


class PageBatcher:
    """Builds PAGES payloads from guest RAM into reused buffers.

    :param ram: the (pages, 4096) view of the source's RAM.
    :param elide_zero: send zero pages without contents (plain may; SEV must not).
    """

    def __init__(self, ram: np.ndarray, *, elide_zero: bool = True) -> None:
        self.ram = ram
        self.elide_zero = elide_zero
        self._pages = np.empty((BATCH_PAGES, PAGE), dtype=np.uint8)
        self._gpas = np.empty(BATCH_PAGES, dtype="<u8")
        self.normal = 0
        self.zero = 0

    def batch(self, page_numbers: np.ndarray) -> list[memoryview]:
        """The payload parts for up to :data:`BATCH_PAGES` pages, ready for ``Channel.send``.

        The views are valid until the next call.
        """
        count = len(page_numbers)
        if count > BATCH_PAGES:
            raise ValueError(f"{count} pages exceed a batch of {BATCH_PAGES}")
        pages = self._pages[:count]
        np.take(self.ram, page_numbers, axis=0, out=pages)
        if self.elide_zero:
            nonzero = pages.view(np.uint64).any(axis=1)
            zero_count = count - int(nonzero.sum())
        else:
            zero_count = 0
        if zero_count:
            order = np.argsort(nonzero, kind="stable")  # zero pages first, order kept
            ordered = page_numbers[order]
            pages = pages[order[zero_count:]]
        else:
            ordered = page_numbers
        gpas = self._gpas[:count]
        np.multiply(ordered, PAGE, out=gpas, casting="unsafe")
        self.zero += zero_count
        self.normal += count - zero_count
        return [memoryview(_COUNTS.pack(count, zero_count)), gpas.data.cast("B"),
                np.ascontiguousarray(pages).data.cast("B")]


def apply_batch(ram: np.ndarray, payload: memoryview) -> int:
    """Write a PAGES payload into the target's RAM; returns the pages written.

    :raises ProtocolError: a malformed payload or a GPA outside RAM.
    """
    if payload.nbytes < _COUNTS.size:
        raise ProtocolError("PAGES frame too short for its counts")
    count: int
    zero_count: int
    count, zero_count = _COUNTS.unpack_from(payload)
    body = _COUNTS.size + 8 * count
    if zero_count > count or payload.nbytes != body + (count - zero_count) * PAGE:
        raise ProtocolError(f"PAGES frame of {payload.nbytes} bytes does not hold {count} "
                            f"pages ({zero_count} zero)")
    gpas = np.frombuffer(payload, dtype="<u8", count=count, offset=_COUNTS.size)
    if count and (int(gpas.max()) >= ram.shape[0] * PAGE or (gpas % PAGE).any()):
        raise ProtocolError("PAGES frame names a GPA outside guest RAM or not page aligned")
    numbers = gpas // PAGE
    ram[numbers[:zero_count]] = 0
    contents = np.frombuffer(payload, dtype=np.uint8, offset=body).reshape(-1, PAGE)
    ram[numbers[zero_count:]] = contents
    return count
