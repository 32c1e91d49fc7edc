"""Throughput of the MH page path against the plain one, measured in the same run.

MH path: four processes, as in a migration on one host: a source MH and a
target MH (the fake MH of ``tests/agents/mh_fake.py``, a real
MigrationHandler behind a real mailbox and SOCK_SEQPACKET interrupt line,
each in its own process as the machine's helper vCPU would be), and a
source and a target agent moving the sealed records over the channel with
the engine's own page loop (prefetch, records straight from and into the
slots).  One full pass over guest RAM; the session's handshake and the
manifest/commit are outside the timed part (printed separately).

Plain path: ``benchmarks/page_path.py``'s two processes over the same
transport and RAM size.  The ratio is MH / plain throughput.

    .venv/bin/python benchmarks/mh_path.py --memory 256M --queues 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "agents"))

from mh_fake import FakeMh, guest_ram

import page_path
from vmmig.agents.engine import _send_pages
from vmmig.agents.mh_mailbox import MailboxClient
from vmmig.agents.mh_session import SourceSession, receive_guest
from vmmig.channel import Channel, FrameKind, connect, listen
from vmmig.config import parse_size


def serve_mh(directory: str, name: str, pages: int, queues: int, batch: int,
             info: Any, stop: Any) -> None:  # noqa: ANN401 (multiprocessing queue and event)
    """A machine's helper vCPU: serve a fake MH until told to stop."""
    if name == "source":
        memory = guest_ram(pages)
    else:
        memory = np.zeros((pages, 4096), np.uint8)
        memory.fill(0)  # fault it in now, as a machine prefaults its RAM
    mh = FakeMh(Path(directory), memory, name=name, queues=queues, max_batch=batch)
    info.put(mh.query())
    stop.wait()
    digest = memory[::97].sum(dtype=np.uint64)  # a sample, to compare source and target
    info.put(int(digest))
    mh.close()


class _Monitor:
    """The two QMP commands the target's MH session sends, without a machine."""

    def cmd(self, cmd: str, **_kwds: object) -> object:
        return {}


def client_of(info: dict[str, Any]) -> MailboxClient:
    return MailboxClient.connect(info["shared-path"], info["mailbox-gpa"],
                                 info["mailbox-size"], info["irq-path"])


def target_agent(address: str, info: dict[str, Any]) -> None:
    server = listen(address)
    sock, _ = server.accept()
    with Channel(sock) as channel, client_of(info) as client:
        receive_guest(_Monitor(), client, channel, lambda *_a, **_k: None)
    server.close()


def mh_run(work: str, address: str, size: int, queues: int, batch: int) -> tuple[float, float]:
    """Seconds of the page pass and of handshake + end game, through the MH path."""
    pages = size // 4096
    infos, stop = mp.Queue(), mp.Event()
    mhs = [mp.Process(target=serve_mh, args=(work, role, pages, queues if role == "source"
                                             else 1, batch, infos, stop))
           for role in ("source", "target")]
    for process in mhs:
        process.start()
    found = [infos.get(timeout=120) for _ in mhs]
    source_info, target_info = sorted(found, key=lambda i: "target" in i["irq-path"])
    target = mp.Process(target=target_agent, args=(address, target_info))
    target.start()
    time.sleep(0.3)
    with connect(address) as channel, client_of(source_info) as client:
        begun = time.perf_counter()
        session = SourceSession.open(client, channel)
        setup = time.perf_counter() - begun
        started = time.perf_counter()
        _send_pages(channel, session.pages, np.arange(pages, dtype=np.uint64))
        channel.send_json(FrameKind.DONE, {})
        channel.receive_json()
        seconds = time.perf_counter() - started
        begun = time.perf_counter()
        session.commit(lambda *_a, **_k: None)
        setup += time.perf_counter() - begun
    target.join(60)
    stop.set()
    digests = [infos.get(timeout=60) for _ in mhs]
    for process in mhs:
        process.join(30)
    assert digests[0] == digests[1], "target RAM differs from the source's"
    return seconds, setup


def plain_run(work: str, address: str, size: int, memory: str) -> float:
    child = subprocess.Popen([sys.executable, page_path.__file__, "--role", "target",
                              "--address", address, "--dir", work, "--memory", memory],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # listening
    seconds = page_path.source(address, Path(work) / "source.ram", size)
    child.wait(60)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--queues", type=int, default=1, help="source MH queues")
    parser.add_argument("--batch", type=int, default=512, help="MH max batch pages")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    args = parser.parse_args()
    size = parse_size(args.memory)
    rate = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as work:
        for name, port in (("plain", 47331), ("mh", 47332)):
            address = (f"unix:{work}/{name}.sock" if args.transport == "unix"
                       else f"tcp:127.0.0.1:{port}")
            if name == "plain":
                seconds = plain_run(work, address, size, args.memory)
                extra = ""
            else:
                seconds, setup = mh_run(work, address, size, args.queues, args.batch)
                extra = f"  (+ {setup * 1000:.0f} ms handshake and end game)"
            rate[name] = size / seconds
            print(f"{name:5} {args.memory} over {args.transport}: {seconds:.3f} s, "
                  f"{rate[name] / 1e9:.2f} GB/s{extra}")
    print(f"ratio mh/plain: {rate['mh'] / rate['plain']:.2f} (target >= 0.7), "
          f"{os.cpu_count()} CPUs, {args.queues} source queue(s), batch {args.batch}")


if __name__ == "__main__":
    main()
