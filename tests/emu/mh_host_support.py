"""The hypervisor's end of an MH mailbox, for tests; this module holds no tests.

:class:`MailboxHost` maps the mailbox out of the machine's shared segment
and rings the interrupt socket, as an agent does (the product's client is
in ``vmmig.agents``): one request at a time, waits bounded by the socket's
timeout.
"""

from __future__ import annotations

import base64
import mmap
import socket
import struct
from pathlib import Path

from sev_support import Owner, qmp

from vmmig.firmware.abi import (
    HEADER_SIZE,
    QUEUE_DESC_SIZE,
    REGION_HEADER_SIZE,
    Command,
    MailboxLayout,
    Request,
    Response,
    pack_request,
    unpack_response,
)
from vmmig.owner.secret_table import MIGRATION_SECRET_GUID, build_secret_table


TIMEOUT = 30.0
MASTER = bytes(range(32))
_U64 = struct.Struct("<Q")


def inject_master_secret(machine, owner: Owner, master: bytes = MASTER) -> None:
    """The owner checks the machine's measurement and injects a secret table holding ``master``."""
    blob = base64.b64decode(qmp(machine, "query-sev-launch-measure")["data"])
    assert owner.measurement_ok(blob, machine.config), "the owner would refuse this launch"
    table = build_secret_table({MIGRATION_SECRET_GUID: master})
    qmp(machine, "sev-inject-launch-secret", **owner.secret_args(blob, table))


class MailboxHost:
    """The host side of one machine's mailbox: the shared pages mapped, the doorbell connected.

    :param info: the machine's ``x-query-mh`` reply (after ``x-mh-start``).
    """

    def __init__(self, info: dict) -> None:
        self.gpa = info["mailbox-gpa"]
        size = -(-info["mailbox-size"] // mmap.PAGESIZE) * mmap.PAGESIZE
        with Path(info["shared-path"]).open("r+b") as shared:
            self.region = mmap.mmap(shared.fileno(), size, offset=self.gpa)
        self.layout = MailboxLayout.unpack_header(self.region)
        self.irq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.irq.settimeout(TIMEOUT)
        self.irq.connect(info["irq-path"])
        self.seq = [0] * self.layout.queue_count

    def _descriptor(self, queue: int) -> int:
        return REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE

    def completion(self, queue: int = 0) -> int:
        return _U64.unpack_from(self.region, self._descriptor(queue) + 8)[0]

    def post(self, data: bytes, queue: int = 0) -> int:
        """Write ``data`` into the next slot, ring the doorbell; the request's sequence."""
        seq = self.seq[queue] + 1
        slot = self.layout.slot_offset(queue, seq % 2)
        self.region[slot:slot + len(data)] = data
        _U64.pack_into(self.region, self._descriptor(queue), seq)
        self.seq[queue] = seq
        self.irq.send(bytes([queue]))
        return seq

    def wait(self, seq: int, queue: int = 0) -> Response:
        """Wait (bounded) for the MH's interrupt answering ``seq``; its response."""
        while self.completion(queue) < seq:
            assert self.irq.recv(64), "the MH hung up"
        slot = self.layout.slot_offset(queue, seq % 2)
        (length,) = struct.unpack_from("<I", self.region, slot + 16)
        return unpack_response(self.region[slot:slot + HEADER_SIZE + length])

    def call(self, command: Command, payload: bytes = b"", queue: int = 0) -> Response:
        """One request and its response."""
        seq = self.seq[queue] + 1
        self.post(pack_request(Request(command, seq, payload)), queue)
        return self.wait(seq, queue)

    def close(self) -> None:
        self.irq.close()
        self.region.close()
