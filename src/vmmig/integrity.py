"""Technology-neutral integrity checks over guest memory (pure functions)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import attrs


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = ["MemoryComparison", "RamScan", "compare_memory", "compare_ram_files", "human_size"]

PAGE = 4096
# Large enough that the comparison runs at memcmp speed, small enough to
# find the first differing page without comparing page by page.
_CHUNK = 16 << 20


@attrs.frozen
class MemoryComparison:
    """The result of comparing two guests' memory page by page."""

    size: int
    differing_pages: int
    first_gpa: int | None

    @property
    def identical(self) -> bool:
        """True when every byte matched (and the sizes agree)."""
        return self.differing_pages == 0

    def describe(self) -> str:
        """One line for the summary."""
        if self.identical:
            return f"{human_size(self.size)} identical"
        assert self.first_gpa is not None
        return (f"{self.differing_pages} of {self.size // PAGE} pages differ, "
                f"first at GPA {self.first_gpa:#x}")


def compare_memory(source: Buffer, target: Buffer) -> MemoryComparison:
    """Compare two memories byte for byte; count the 4 KiB pages that differ.

    Memories of different sizes never compare equal: the extra pages count as
    differing.
    """
    a, b = memoryview(source).cast("B"), memoryview(target).cast("B")
    size = min(len(a), len(b))
    differing = (max(len(a), len(b)) - size + PAGE - 1) // PAGE
    first: int | None = size if differing else None
    for start in range(0, size, _CHUNK):
        end = min(size, start + _CHUNK)
        # bytes compare with memcmp; memoryviews compare item by item, 16x slower.
        if bytes(a[start:end]) == bytes(b[start:end]):
            continue
        for page in range(start, end, PAGE):
            if a[page:page + PAGE] != b[page:page + PAGE]:
                differing += 1
                first = page if first is None or page < first else first
    return MemoryComparison(max(len(a), len(b)), differing, first)


@attrs.frozen
class RamScan:
    """Two RAM files compared, plus what workload checks need of the target's.

    :ivar comparison: page-by-page comparison of source and target.
    :ivar first_page: the target's page 0 (where test guests publish their state).
    :ivar page_heads: byte 0 of every page of the target.
    :ivar size: the target's RAM size.
    """

    comparison: MemoryComparison
    first_page: bytes
    page_heads: bytes
    size: int


def compare_ram_files(source: Path, target: Path) -> RamScan:
    """Compare two guests' RAM files (QEMU's shared memory backends) in one pass.

    Reading the files in large chunks is several times faster than mapping
    them, where every 4 KiB page costs a fault.
    """
    a_chunk, b_chunk = bytearray(_CHUNK), bytearray(_CHUNK)
    differing, first, offset = 0, None, 0
    heads, first_page = [], b""
    with source.open("rb", buffering=0) as a, target.open("rb", buffering=0) as b:
        while True:
            a_len, b_len = a.readinto(a_chunk), b.readinto(b_chunk)
            if not a_len and not b_len:
                break
            a_view, b_view = memoryview(a_chunk)[:a_len], memoryview(b_chunk)[:b_len]
            if not first_page:
                first_page = bytes(b_view[:PAGE])
            heads.append(bytes(b_view[::PAGE]))
            same = (a_chunk == b_chunk if a_len == b_len == _CHUNK
                    else bytes(a_view) == bytes(b_view))
            if not same:
                part = compare_memory(a_view, b_view)
                differing += part.differing_pages
                if first is None and part.first_gpa is not None:
                    first = offset + part.first_gpa
            offset += max(a_len, b_len)
    return RamScan(MemoryComparison(offset, differing, first), first_page, b"".join(heads), offset)


def human_size(n: int) -> str:
    """``1073741824`` -> ``"1.0 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
