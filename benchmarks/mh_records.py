"""Throughput of the Migration Handler's page records against a plain copy.

For each batch size, the same GPAs (a random permutation of guest RAM, as
dirty pages are scattered) go two ways through one thread:

- copy: the unencrypted path: gather the pages from the source RAM into a
  buffer, scatter the buffer into the target RAM (two memcpys);
- sealed: :class:`RecordSealer` seals the batch into a record (gather, zero
  bitmap, ONE AES-256-GCM call) and :class:`RecordOpener` opens it into the
  target RAM (one AES-256-GCM call, checks, scatter).

Ratios are sealed / copy.  Per side (seal vs gather, open vs scatter) is
what a migration sees, since source and target MHs run on different hosts.

    .venv/bin/python benchmarks/mh_records.py --memory 64M --zero 0.25
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from vmmig.config import parse_size
from vmmig.firmware.abi import PAGE_SIZE
from vmmig.firmware.keys import derive_session_keys
from vmmig.firmware.records import RecordOpener, RecordSealer, page_record_size


def timed(step: Callable[[int], None], rounds: int) -> float:
    """Seconds for ``rounds`` calls, best of three runs."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(rounds):
            step(i)
        best = min(best, time.perf_counter() - start)
    return best


def measure(memory: np.ndarray, batch: int, most_pages: int) -> dict[str, float]:
    """Pages per second of each path for one batch size."""
    pages = len(memory)
    rng = np.random.default_rng(batch)
    order = rng.permutation(pages).astype(np.uint64) * PAGE_SIZE
    rounds = min(pages // batch, max(1, most_pages // batch))
    batches = [order[i * batch : (i + 1) * batch] for i in range(rounds)]
    frames = [(b // PAGE_SIZE).astype(np.intp) for b in batches]
    target = np.zeros_like(memory)
    buffer = np.empty((batch, PAGE_SIZE), np.uint8)

    def gather(i: int) -> None:
        np.take(memory, frames[i], axis=0, out=buffer, mode="clip")

    def scatter(i: int) -> None:
        target[frames[i]] = buffer

    keys = derive_session_keys(bytes(32), b"\x01" * 32, b"\x02" * 32)
    # Records live in reused buffers, as in the mailbox's slots: touch them once.
    records = [memoryview(bytearray(b"\xff" * page_record_size(batch))) for _ in range(rounds)]
    ends: dict[str, RecordSealer | RecordOpener] = {}

    def seal(i: int) -> None:
        if i == 0:  # a fresh session each run: versions and sequence start over
            ends["sealer"] = RecordSealer(memory, keys.data, keys.session_id, batch)
        sealer = ends["sealer"]
        assert isinstance(sealer, RecordSealer)
        sealer.seal_into(batches[i], records[i])

    def open_(i: int) -> None:
        if i == 0:
            ends["opener"] = RecordOpener(target, keys.data, keys.session_id, batch)
        opener = ends["opener"]
        assert isinstance(opener, RecordOpener)
        opener.open(records[i])

    times = {
        "gather": timed(gather, rounds),
        "scatter": timed(scatter, rounds),
        "seal": timed(seal, rounds),
        "open": timed(open_, rounds),
    }
    assert np.array_equal(target[frames[0]], memory[frames[0]])
    moved = rounds * batch
    return {name: moved / seconds for name, seconds in times.items()}


def main() -> None:
    """Print a table of pages/s and ratios for batches of 1, 64, 256 and 512 pages."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="64M", help="guest RAM (default 64M)")
    parser.add_argument("--zero", type=float, default=0.25, help="fraction of zero pages")
    parser.add_argument("--pages", type=int, default=8192, help="pages per measurement")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (1 64 256 512)")
    args = parser.parse_args()
    pages = parse_size(args.memory) // PAGE_SIZE
    rng = np.random.default_rng(0)
    memory = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    memory[rng.random(pages) < args.zero] = 0
    print(f"guest {args.memory}, {args.zero:.0%} zero pages, GB/s (1e9 bytes/s), one thread")
    print(
        f"{'batch':>5} {'gather':>7} {'seal':>7} {'ratio':>6} {'scatter':>7} {'open':>7} "
        f"{'ratio':>6} {'copy':>7} {'sealed':>7} {'ratio':>6}"
    )
    for batch in args.batch or [1, 64, 256, 512]:
        rate = {k: v * PAGE_SIZE / 1e9 for k, v in measure(memory, batch, args.pages).items()}
        copy = 1 / (1 / rate["gather"] + 1 / rate["scatter"])
        sealed = 1 / (1 / rate["seal"] + 1 / rate["open"])
        print(
            f"{batch:>5} {rate['gather']:7.2f} {rate['seal']:7.2f} "
            f"{rate['seal'] / rate['gather']:6.0%} {rate['scatter']:7.2f} {rate['open']:7.2f} "
            f"{rate['open'] / rate['scatter']:6.0%} {copy:7.2f} {sealed:7.2f} {sealed / copy:6.0%}"
        )


if __name__ == "__main__":
    main()
