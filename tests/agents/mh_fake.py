"""Test support: a stand-in for an emulated SEV machine's MH and its QMP, without the machine.

:class:`FakeMh` serves a real :class:`~vmmig.firmware.handler.MigrationHandler`
over numpy "guest RAM" the way the machine does (x-query-mh's interface): a
mailbox region at ``mailbox-gpa`` of a guest-shared file the size of guest
RAM, an interrupt line on a Unix SOCK_SEQPACKET socket (one host
connection), a helper thread that wakes on every message, answers the posted
requests of every queue in order (at most two per queue per wake-up) and
sends back one byte per queue it advanced.  :class:`FakeMonitor` answers the
QMP commands the precopy engine and the MH session send.  Not the product.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from vmmig.firmware.abi import (
    HEADER_SIZE,
    PAGE_SIZE,
    QUEUE_DESC_SIZE,
    REGION_HEADER_SIZE,
    MailboxLayout,
    Role,
)
from vmmig.firmware.handler import MigrationHandler


# The firmware tests' helpers (guest RAM, the master secret) serve here too.
sys.path.insert(0, str(Path(__file__).parents[1] / "firmware"))
from mh_support import SECRET, guest_memory


_U64 = struct.Struct("<Q")


#: Random RAM, about a quarter of it zero pages.
guest_ram = guest_memory


class FakeMh:
    """One machine's MH: guest RAM below the mailbox reservation, the region above it.

    :param directory: where the shared file and the interrupt socket go.
    :param memory: the MH's guest RAM, ``(pages, 4096)``.
    :param delay: seconds the helper sleeps per request (a slow MH).
    """

    def __init__(self, directory: Path, memory: np.ndarray, *, name: str = "mh", queues: int = 1,
                 max_batch: int = 64, roles: frozenset[Role] = frozenset(Role) - {Role.NONE}
                 ) -> None:
        self.memory = memory
        self.layout = MailboxLayout(queue_count=queues, max_batch_pages=max_batch)
        self.handler = MigrationHandler(memory, SECRET, max_batch_pages=max_batch, roles=roles)
        self.gpa = memory.nbytes
        self.ram_size = self.gpa + -(-self.layout.region_size // PAGE_SIZE) * PAGE_SIZE
        self.shared_path = directory / f"{name}.shared"
        self.irq_path = directory / f"{name}.irq"
        with self.shared_path.open("w+b") as stream:
            stream.truncate(self.ram_size)
        self._shared = np.memmap(self.shared_path, dtype=np.uint8, mode="r+")
        region = self._region = self._shared[self.gpa:]
        region[:REGION_HEADER_SIZE] = np.frombuffer(self.layout.pack_header(), np.uint8)
        for queue in range(queues):
            at = REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE
            region[at:at + QUEUE_DESC_SIZE] = np.frombuffer(self.layout.pack_queue(queue),
                                                            np.uint8)
        self._completion = [0] * queues
        #: While set, the helper swallows wake-ups without answering (a stalled MH).
        self.stalled = threading.Event()
        #: Requests answered, per queue (tests check that several queues were used).
        self.answered = [0] * queues
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(str(self.irq_path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, name="fake-mh", daemon=True)
        self._thread.start()

    def query(self) -> dict[str, object]:
        """x-query-mh."""
        return {"state": "running", "mailbox-gpa": self.gpa,
                "mailbox-size": self.layout.region_size, "queues": self.layout.queue_count,
                "irq-path": str(self.irq_path), "shared-path": str(self.shared_path),
                "role": None}

    def _serve(self) -> None:
        """One host connection at a time, as the machine's MH: the next after a hang-up."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._conn = conn
            with conn:
                self._serve_host(conn)

    def _serve_host(self, conn: socket.socket) -> None:
        while True:
            try:
                if not conn.recv(64):
                    return
                if self.stalled.is_set():
                    continue
                for queue in self._service():
                    conn.send(bytes([queue]))
            except OSError:
                return

    def _service(self) -> list[int]:
        region, layout = self._region, self.layout
        capacity = layout.slot_capacity
        advanced = []
        for queue in range(layout.queue_count):
            descriptor = REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE
            (doorbell,) = _U64.unpack_from(region, descriptor)
            done = self._completion[queue]
            for seq in range(done + 1, min(doorbell, done + 2) + 1):
                slot = layout.slot_offset(queue, seq % 2)
                (length,) = struct.unpack_from("<I", region, slot + 4)
                private = region[slot:slot + min(HEADER_SIZE + length, capacity)].tobytes()
                self.handler.handle_into(private, memoryview(region[slot:slot + capacity]))
                _U64.pack_into(region, descriptor + 8, seq)
                self._completion[queue] = seq
                self.answered[queue] += 1
            if self._completion[queue] != done:
                advanced.append(queue)
        return advanced

    def close(self) -> None:
        for sock in (self._listener, self._conn):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)
        del self._region, self._shared


class FakeMonitor:
    """The QMP commands the engine and the MH session send to an SEV machine.

    RAM is private (``ram-path`` None): only the MH reads it.  ``dirty``
    says how many random pages the "guest" rewrites before each dirty-log
    sync, for a few rounds, so later rounds have something to send.
    """

    def __init__(self, mh: FakeMh, directory: Path, *, dirty: int = 0, dirty_rounds: int = 2,
                 seed: int = 1) -> None:
        self.mh = mh
        self.pages = mh.ram_size // PAGE_SIZE
        self.dirty_path = directory / f"{mh.shared_path.stem}.dirty"
        self.dirty_path.write_bytes(bytes(8 * self.pages))
        self.dirty = dirty
        self.dirty_rounds = dirty_rounds
        self.rng = np.random.default_rng(seed)
        self.commands: list[str] = []
        self.vcpus: object = None

    def cmd(self, cmd: str, **kwds: object) -> object:
        self.commands.append(cmd)
        if cmd == "x-query-memory":
            return {"size": self.mh.ram_size, "ram-path": None,
                    "dirty-pages-path": str(self.dirty_path)}
        if cmd == "x-query-mh":
            return self.mh.query()
        if cmd == "x-dirty-log-sync":
            return {"dirty": self._dirty()}
        if cmd == "query-cpus-fast":
            return [{"cpu-index": 0}]
        if cmd == "x-vcpu-state-export":
            return [{"rip": 0x1234}]
        if cmd == "x-vcpu-state-import":
            self.vcpus = kwds["vmsas"]
        return {}

    def _dirty(self) -> int:
        """The guest wrote some pages; they and (always) the mailbox pages are dirty."""
        memory = self.mh.memory
        count = self.dirty if self.dirty_rounds > 0 else 0
        self.dirty_rounds -= 1
        pages = np.unique(self.rng.integers(0, len(memory), count))
        memory[pages, :8] = self.rng.integers(0, 256, (len(pages), 8), dtype=np.uint8)
        mailbox = np.arange(len(memory), self.pages)  # the host writes there all the time
        dirty = np.concatenate([pages, mailbox]).astype("<u8")
        with self.dirty_path.open("r+b") as stream:
            stream.write(dirty.tobytes())
        return len(dirty)
