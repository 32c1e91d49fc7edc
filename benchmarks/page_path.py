"""Throughput of the plain page path: two processes moving guest RAM over the channel.

The source process batches every page of a RAM file (all non-zero, as a
guest that wrote all its memory) into PAGES frames; the target process
writes them into its own RAM file.  This is the data path of ``plain`` on
the emulated platform, without the machines.

    .venv/bin/python benchmarks/page_path.py --memory 1G --transport unix
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vmmig.agents.pages import BATCH_PAGES, PageBatcher, PageReceiver, prefault, ram_pages
from vmmig.channel import Channel, FrameKind, connect, listen
from vmmig.config import parse_size


def ram_file(path: Path, size: int, *, fill: bool) -> mmap.mmap:
    with path.open("w+b") as stream:
        stream.truncate(size)
        ram = mmap.mmap(stream.fileno(), size)
    # A machine prefaults its RAM when it starts: first-touch faults would
    # otherwise cap writes near 1 GB/s (machine-facts).
    prefault(ram)
    if fill:
        view = ram_pages(ram, writable=True)
        view[:, 0] = 1  # every page non-zero, the rest untouched (as the a-b guest leaves it)
    return ram


def target(address: str, ram_path: Path, size: int) -> None:
    ram = ram_file(ram_path, size, fill=False)
    view = ram_pages(ram, writable=True)
    server = listen(address)
    print(f"listening {server.getsockname()}", flush=True)
    sock, _ = server.accept()
    channel = Channel(sock)
    receiver = PageReceiver(view)
    while True:
        header = channel.receive_header()
        if header.kind is FrameKind.DONE:
            channel.receive_payload(header)
            break
        receiver.receive(channel, header)
    channel.send_json(FrameKind.DONE, {"received": channel.bytes_received})
    del view, receiver
    ram.close()


def source(address: str, ram_path: Path, size: int) -> float:
    ram = ram_file(ram_path, size, fill=True)
    batcher = PageBatcher(ram_pages(ram))
    pages = np.arange(size // 4096, dtype=np.uint64)
    channel = connect(address)
    started = time.perf_counter()
    for start in range(0, len(pages), BATCH_PAGES):
        channel.send(FrameKind.PAGES, *batcher.batch(pages[start:start + BATCH_PAGES]))
    channel.send_json(FrameKind.DONE, {})
    channel.receive_json()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--role", choices=("source", "target"), default="source")
    parser.add_argument("--address")
    parser.add_argument("--dir")
    args = parser.parse_args()
    size = parse_size(args.memory)
    if args.role == "target":
        target(args.address, Path(args.dir) / "target.ram", size)
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:
        address = (f"unix:{work}/chan.sock" if args.transport == "unix"
                   else "tcp:127.0.0.1:47321")
        child = subprocess.Popen([sys.executable, __file__, "--role", "target", "--address",
                                  address, "--dir", work, "--memory", args.memory],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        child.stdout.readline()  # listening
        seconds = source(address, Path(work) / "source.ram", size)
        child.wait(60)
    print(f"{args.memory} over {args.transport}: {seconds:.3f} s, "
          f"{size / seconds / 1e9:.2f} GB/s, {size / 4096 / seconds / 1e3:.0f} k pages/s")


if __name__ == "__main__":
    main()
