"""The plain page path: batches of guest pages read from and written to guest RAM.

A ``PAGES`` frame's payload for ``plain`` is::

    u32 count   u32 zero_count   u64 gpa[count]   page[count - zero_count]

The first ``zero_count`` GPAs are zero pages, sent without contents (QEMU's
"duplicate" pages); the others are followed by their 4 KiB contents in the
same order.  A run of consecutive pages goes straight from the source's RAM
mapping to the socket and from the socket into the target's RAM mapping;
other batches use numpy fancy indexing into preallocated buffers: no
per-page Python work and no allocation per batch on the data path.
"""

from __future__ import annotations

import mmap
import struct
from typing import Final

import numpy as np

from vmmig.channel import Channel
from vmmig.channel.frames import FrameHeader, ProtocolError


__all__ = ["BATCH_PAGES", "PAGE", "PageBatcher", "PageReceiver", "prefault", "ram_pages"]

PAGE: Final = 4096
#: Pages per frame: large enough to amortize a frame, small enough to pipeline.
BATCH_PAGES: Final = 256
_COUNTS = struct.Struct("<II")
#: Linux 5.14's madvise advice; Python 3.11's mmap module does not name it yet.
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23


def prefault(ram: mmap.mmap, *, writable: bool = True) -> None:
    """Fault in every page of a mapping now rather than page by page.

    First-touch faults cap writes into fresh memory near 1-2 GB/s; a target
    prefaults its RAM before the stream arrives, a source the RAM it reads.
    """
    ram.madvise(MADV_POPULATE_WRITE if writable else MADV_POPULATE_READ)


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

    #: Most pages one PAGES frame carries.
    batch_pages = BATCH_PAGES

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
        gpas = self._gpas[:count]
        if _contiguous(page_numbers):
            first = int(page_numbers[0])
            block = self.ram[first:first + count]
            if not self.elide_zero or block.view(np.uint64).any(axis=1).all():
                # Consecutive pages with no zero page: sent straight from the mapping.
                np.multiply(page_numbers, PAGE, out=gpas, casting="unsafe")
                self.normal += count
                return [memoryview(_COUNTS.pack(count, 0)), gpas.data.cast("B"),
                        block.data.cast("B")]
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
        np.multiply(ordered, PAGE, out=gpas, casting="unsafe")
        self.zero += zero_count
        self.normal += count - zero_count
        parts = [memoryview(_COUNTS.pack(count, zero_count)), gpas.data.cast("B")]
        if zero_count < count:  # a view of no pages cannot be cast to bytes
            parts.append(np.ascontiguousarray(pages).data.cast("B"))
        return parts


def _contiguous(numbers: np.ndarray) -> bool:
    count = len(numbers)
    return bool(count) and int(numbers[-1]) - int(numbers[0]) == count - 1 and bool(
        (np.diff(numbers.astype(np.int64)) == 1).all())


class PageReceiver:
    """Writes PAGES frames into the target's RAM, straight from the socket where it can.

    GPAs are checked before any page is written; a run of consecutive pages
    is received directly into the RAM mapping, other batches through one
    reused buffer.

    :param ram: the (pages, 4096) writable view of the target's RAM.
    """

    def __init__(self, ram: np.ndarray) -> None:
        self.ram = ram
        self._counts = bytearray(_COUNTS.size)
        self._gpas = np.empty(BATCH_PAGES, dtype="<u8")
        self._pages = np.empty((BATCH_PAGES, PAGE), dtype=np.uint8)

    def receive(self, channel: Channel, header: FrameHeader) -> int:
        """Receive the payload of the PAGES frame ``header``; returns the pages written.

        :raises ProtocolError: a malformed payload or a GPA outside RAM.
        """
        if header.length < _COUNTS.size:
            raise ProtocolError("PAGES frame too short for its counts")
        channel.receive_into(memoryview(self._counts))
        count: int
        zero_count: int
        count, zero_count = _COUNTS.unpack(self._counts)
        expected = _COUNTS.size + 8 * count + (count - zero_count) * PAGE
        if count > BATCH_PAGES or zero_count > count or header.length != expected:
            raise ProtocolError(f"PAGES frame of {header.length} bytes does not hold {count} "
                                f"pages ({zero_count} zero)")
        gpas = self._gpas[:count]
        channel.receive_into(gpas.data.cast("B"))
        if count and (int(gpas.max()) >= self.ram.shape[0] * PAGE or (gpas % PAGE).any()):
            raise ProtocolError("PAGES frame names a GPA outside guest RAM or not page aligned")
        numbers = gpas // PAGE
        normal = numbers[zero_count:]
        if _contiguous(normal):
            first = int(normal[0])
            channel.receive_into(self.ram[first:first + len(normal)].data.cast("B"))
        elif len(normal):
            pages = self._pages[:len(normal)]
            channel.receive_into(pages.data.cast("B"))
            self.ram[normal] = pages
        self.ram[numbers[:zero_count]] = 0
        return count
