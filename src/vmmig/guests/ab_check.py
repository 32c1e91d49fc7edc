"""The a-b guest's integrity rule, checked on a copy or mapping of guest RAM.

The a-b guest (``ab.S``) increments byte 0 of every 4 KiB page in
``[start, end)``, page after page, forever.  Wherever it stopped, walking
the pages in order every byte equals its predecessor except at most once,
where the incrementer was: there the byte is one less (mod 256) than its
predecessor.  This is the rule of QEMU's migration-test ``check_guests_ram``;
a migration that lost or reordered a dirty page breaks it.

The guest publishes the region at :data:`INFO_ADDR`::

    0x500  u32  start of the region, always 0x100000 (1 MiB)
    0x504  u32  end of the region, exclusive, page aligned: the end of RAM below 4 GiB
    0x508  u32  complete passes so far (wraps)
    0x50c  u32  reserved, 0

Sans-IO: every function takes a bytes-like object of the whole guest RAM
(GPA 0 at offset 0), typically a memoryview of an mmap of the RAM file.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import attrs

from vmmig.errors import IntegrityError


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = [
    "AB_START",
    "INFO_ADDR",
    "PAGE_SIZE",
    "AbCheck",
    "ab_passes",
    "ab_region",
    "check_ab",
    "check_ab_heads",
]

PAGE_SIZE = 4096
#: Physical address of the block the guest publishes (see the module doc).
INFO_ADDR = 0x500
#: First byte of the region the guest dirties.
AB_START = 0x100000

_INFO = struct.Struct("<III")
#: translate() tables: one less mod 256; 1 for a non-zero byte, 0 for zero.
_MINUS_ONE = bytes((b - 1) % 256 for b in range(256))
_NONZERO = bytes([0]) + bytes([1]) * 255


@attrs.frozen
class AbCheck:
    """The verdict of :func:`check_ab` on one memory image.

    :param ok: the rule holds: no bad page and at most one edge.
    :param pages: how many pages the region has.
    :param edges: places where a page's byte is its predecessor's minus one.
    :param bad: other places where a page's byte differs from its predecessor's.
    :param first_bad: GPA of the first page that breaks the rule, None if ok.
    :param detail: one line for humans.
    """

    ok: bool
    pages: int
    edges: int
    bad: int
    first_bad: int | None
    detail: str


def ab_region(memory: Buffer, size: int | None = None) -> tuple[int, int]:
    """The region the a-b guest says it dirties.

    :param memory: the whole guest RAM, or at least its first page.
    :param size: the guest RAM's size when ``memory`` is only its start.
    :returns: ``(start, end)`` GPAs, end exclusive.
    :raises IntegrityError: the bounds are missing or impossible (the guest has
        not booted yet, is not the a-b guest, or the memory is not all there).
    """
    with memoryview(memory) as mv:
        size = mv.nbytes if size is None else size
        if mv.nbytes < INFO_ADDR + _INFO.size:
            raise IntegrityError(f"guest memory of {size} bytes is too small for the a-b guest")
        start, end, _ = _INFO.unpack_from(mv, INFO_ADDR)
    if start != AB_START:
        raise IntegrityError(
            f"no a-b region at {INFO_ADDR:#x}: start is {start:#x}, not {AB_START:#x} "
            "(guest not booted yet, or not the a-b guest)"
        )
    if end % PAGE_SIZE or end <= start or end > size:
        raise IntegrityError(
            f"a-b region end {end:#x} is not a page-aligned address in "
            f"({start:#x}, {size:#x}] (guest memory of {size} bytes)"
        )
    return start, end


def ab_passes(memory: Buffer) -> int:
    """How many complete passes the a-b guest has made, modulo 2**32.

    :param memory: the whole guest RAM.
    :returns: the guest's pass counter; it grows while the guest runs.
    """
    with memoryview(memory) as mv:
        passes: int = _INFO.unpack_from(mv, INFO_ADDR)[2]
    return passes


def check_ab(memory: Buffer, *, region: tuple[int, int] | None = None) -> AbCheck:
    """Check the a-b rule on a memory image.

    :param memory: the whole guest RAM.
    :param region: ``(start, end)`` GPAs to check, page aligned, end exclusive;
        by default the region the guest published (:func:`ab_region`).
    :returns: the verdict; a broken rule is reported, not raised.
    :raises IntegrityError: no region given and the guest published none.
    :raises ValueError: the region given is not page aligned or not in memory.
    """
    if region is None:
        start, end = ab_region(memory)
    else:
        start, end = region
    with memoryview(memory) as mv, mv.cast("B") as flat:
        # One strided copy picks byte 0 of every page, in C.
        return check_ab_heads(bytes(flat[::PAGE_SIZE]), (start, end))


def check_ab_heads(heads: bytes, region: tuple[int, int]) -> AbCheck:
    """Check the a-b rule given byte 0 of every page of guest RAM.

    :param heads: byte 0 of page 0, 1, 2, ... of the whole guest RAM.
    :param region: ``(start, end)`` GPAs to check, page aligned, end exclusive.
    :returns: the verdict; a broken rule is reported, not raised.
    :raises ValueError: the region is not page aligned or not in memory.
    """
    start, end = region
    if start % PAGE_SIZE or end % PAGE_SIZE or not 0 <= start < end <= len(heads) * PAGE_SIZE:
        raise ValueError(f"region [{start:#x}, {end:#x}) is not whole pages of the memory")
    return _judge(heads[start // PAGE_SIZE:end // PAGE_SIZE], start)


def _judge(column: bytes, start: int) -> AbCheck:
    """Apply the rule to byte 0 of each page, in page order.

    Bytewise comparisons run on big integers, which CPython does in C: the
    XOR of the column with itself shifted by one page is zero exactly where a
    page equals its predecessor, and the XOR with the shifted, decremented
    column is zero exactly at an edge.
    """
    pages = len(column)
    n = pages - 1
    prev = int.from_bytes(column[:-1], "little")
    curr = int.from_bytes(column[1:], "little")
    prev_minus_one = int.from_bytes(column[:-1].translate(_MINUS_ONE), "little")
    diff = (prev ^ curr).to_bytes(n, "little")
    step = (prev_minus_one ^ curr).to_bytes(n, "little")
    edges = step.count(0)
    bad = n - diff.count(0) - edges
    span = f"{pages} pages [{start:#x}, {start + pages * PAGE_SIZE:#x})"

    if bad == 0 and edges <= 1:
        if edges:
            where = f"incrementer at {start + (step.index(0) + 1) * PAGE_SIZE:#x}"
        else:
            where = "all equal"
        detail = f"a-b rule holds on {span}: {where}"
        return AbCheck(ok=True, pages=pages, edges=edges, bad=0, first_bad=None, detail=detail)

    # Index i names the pair (page i, page i + 1); the culprit is page i + 1.
    culprits = []
    if bad:
        mismatch = int.from_bytes(diff.translate(_NONZERO), "little")
        not_edge = int.from_bytes(step.translate(_NONZERO), "little")
        culprits.append((mismatch & not_edge).to_bytes(n, "little").index(1))
    if edges > 1:
        culprits.append(step.index(0, step.index(0) + 1))
    i = min(culprits)
    first_bad = start + (i + 1) * PAGE_SIZE
    detail = (
        f"a-b rule broken on {span}: {bad} bad page(s), {edges} edge(s); first at "
        f"{first_bad:#x}: {column[i + 1]:#04x} after {column[i]:#04x}"
    )
    return AbCheck(ok=False, pages=pages, edges=edges, bad=bad, first_bad=first_bad, detail=detail)
