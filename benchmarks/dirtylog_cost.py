"""Cost of one dirty-log collection, against guest RAM size and dirty-page count.

For each method, RAM size and number of dirty pages, writes that many pages
of a fully populated memfd mapping (distinct pages at random, so that each is
a run of its own: the most ``page_region`` entries for ``PAGEMAP_SCAN``), then
times :meth:`~vmmig.platforms.emu.dirtylog.DirtyLog.collect`; the median of
``--repetitions`` rounds is reported.  The "write" column is what writing the
pages cost the writer, per page: with the kernel method it includes the
write-protect fault the first write to each page takes.

    .venv/bin/python benchmarks/dirtylog_cost.py --sizes 256M 1G --dirty 0 1000 10000 100000
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from typing import Literal

import numpy as np

from vmmig.platforms.emu.dirtylog import open_dirty_log, probe


PAGE = 4096


def parse_size(text: str) -> int:
    """``256M`` or ``1G`` in bytes."""
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()]


def guest_ram(size: int) -> mmap.mmap:
    """A fully written memfd mapping, as the machine's RAM is once the guest has run."""
    fd = os.memfd_create("vmmig-bench-ram")
    try:
        os.ftruncate(fd, size)
        ram = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    np.frombuffer(ram, np.uint64)[:] = 1
    return ram


def measure(ram: mmap.mmap, method: Literal["kernel", "compare"], dirty: int,
            repetitions: int, rng: np.random.Generator) -> tuple[float, float]:
    """Median seconds per collect() and per page written, for ``dirty`` pages per round."""
    words = np.frombuffer(ram, np.uint64)
    pages = len(ram) // PAGE
    collects, writes = [], []
    with open_dirty_log(ram, method=method) as log:
        for _ in range(repetitions):
            chosen = rng.choice(pages, dirty, replace=False) * (PAGE // 8)
            started = time.perf_counter()
            words[chosen] += 1  # a new value, so that the comparison sees every write
            writes.append((time.perf_counter() - started) / max(dirty, 1))
            started = time.perf_counter()
            found = log.collect()
            collects.append(time.perf_counter() - started)
            if len(found) != dirty:
                raise AssertionError(f"{method}: {dirty} pages written, {len(found)} reported")
    return statistics.median(collects), statistics.median(writes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["256M", "1G"])
    parser.add_argument("--dirty", nargs="+", type=int, default=[0, 1000, 10_000, 100_000])
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    found = probe()
    print(f"kernel method: {'available' if found.available else 'UNAVAILABLE'} ({found.reason})")
    methods: list[Literal["kernel", "compare"]] = (["kernel", "compare"] if found.available
                                                    else ["compare"])
    rng = np.random.default_rng(2024)
    print(f"{'method':<8} {'RAM':>5} {'dirty':>7} {'collect (ms)':>13} {'per dirty page':>15} "
          f"{'write (ns/page)':>16}")
    for size_text in args.sizes:
        for method in methods:
            # A fresh mapping per method: a closed kernel log leaves every page one
            # minor fault on its next write, which would be charged to the next method.
            ram = guest_ram(parse_size(size_text))
            for dirty in args.dirty:
                if dirty > len(ram) // PAGE:
                    print(f"{method:<8} {size_text:>5} {dirty:>7}   (more than its "
                          f"{len(ram) // PAGE} pages)")
                    continue
                collect, write = measure(ram, method, dirty, args.repetitions, rng)
                per_page = f"{collect / dirty * 1e9:.0f} ns" if dirty else "-"
                write_text = f"{write * 1e9:.0f}" if dirty else "-"
                print(f"{method:<8} {size_text:>5} {dirty:>7} {collect * 1e3:>13.3f} "
                      f"{per_page:>15} {write_text:>16}")
            ram.close()

if __name__ == "__main__":
    main()
