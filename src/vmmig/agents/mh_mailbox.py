"""The hypervisor's side of the Migration Handler's mailbox (ABI v1, ``docs/mh-mailbox-abi.md``).

The MH serves a region of guest-shared memory: a header, one descriptor per
queue (one queue per helper vCPU) and two slots per queue.  The host writes
a request into a slot, stores the queue's doorbell word and sends the queue
index as one byte on the interrupt line (a Unix SOCK_SEQPACKET socket); the
MH answers in the same slot, stores the completion word and sends the queue
index back.  :class:`MailboxClient` is that host side, for any number of
queues with two requests in flight on each (the double buffer of §1.3).

The agent holding this client is untrusted and the MH is trusted, but the
client still checks what it reads (completion beyond the doorbell, sequence
and command echo, lengths): a confused or stalled MH must end the migration
with a clear one-line error, not a hang or a misparsed record.  Requests and
responses are read and written in place (:class:`Ticket` and :class:`Reply`
hold views of the slot): a page record is about 2 MiB, and the data path
moves it between the slot and the channel without copying it.
"""

from __future__ import annotations

import contextlib
import mmap
import socket
import struct
import time
from pathlib import Path
from typing import Final

import attrs
import numpy as np

from vmmig.channel.frames import ProtocolError
from vmmig.errors import MigrationFailed
from vmmig.firmware import abi
from vmmig.firmware.abi import HEADER_SIZE, QUEUE_DESC_SIZE, REGION_HEADER_SIZE, Command, Status


__all__ = ["DEFAULT_TIMEOUT", "MailboxClient", "MhRefused", "Reply", "Ticket"]

#: Seconds an MH gets to answer one request (the manifest digests all RAM).
DEFAULT_TIMEOUT: Final = 30.0
_U32: Final = struct.Struct("<I")
#: Where the request's payload_length (§2.1) and the response's (§2.2) sit.
_REQUEST_LENGTH_AT: Final = 4
_RESPONSE_LENGTH_AT: Final = 16
#: Interrupt messages are one byte; read a few at once to drain stale ones.
_IRQ_READ: Final = 64


class MhRefused(ProtocolError):
    """The MH answered a request with a non-OK status.

    :param command: the refused command.
    :param status: the MH's status code.
    :param detail: the response's detail word (MANIFEST: mismatch bits).
    """

    def __init__(self, command: Command, status: Status, detail: int = 0) -> None:
        more = f" (detail {detail:#x})" if detail else ""
        super().__init__(f"the MH refused {command.name}: {status.name}{more}")
        self.command = command
        self.status = status
        self.detail = detail


@attrs.frozen
class Ticket:
    """A reserved request: its queue, its mailbox sequence and where its payload goes.

    :ivar payload: the slot after the request header; write the payload here,
        then :meth:`MailboxClient.post` the ticket.
    """

    queue: int
    seq: int
    payload: memoryview = attrs.field(repr=False, eq=False)


@attrs.frozen
class Reply:
    """A response read in place; ``payload`` is valid until the slot's next request."""

    command: Command
    status: Status
    detail: int
    payload: memoryview = attrs.field(repr=False, eq=False)

    def ok(self) -> memoryview:
        """The payload of an OK response.

        :raises MhRefused: any other status.
        """
        if self.status is not Status.OK:
            raise MhRefused(self.command, self.status, self.detail)
        return self.payload


@attrs.define
class _Queue:
    """The host's bookkeeping of one queue (the shared words are never trusted as such)."""

    reserved: int = 0  # highest sequence handed out by reserve()
    posted: int = 0  # highest sequence whose doorbell was rung
    #: Posted requests whose response has not been read yet, by sequence.
    waiting: dict[int, Command] = attrs.Factory(dict)


class MailboxClient:
    """The host side of an MH mailbox: post requests, wait for their responses.

    :param region: the mapped region (header at offset 0), writable.
    :param irq: the connected interrupt socket (SOCK_SEQPACKET); the client owns it.
    :param timeout: seconds one request may take.
    :raises ProtocolError: the region is not a version-1 mailbox.
    """

    def __init__(self, region: mmap.mmap, irq: socket.socket, *,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        view = memoryview(region)
        try:
            self.layout = abi.MailboxLayout.unpack_header(view)
        except (ValueError, struct.error) as err:
            raise ProtocolError(f"MH mailbox: {err}") from None
        if len(region) < self.layout.region_size:
            raise ProtocolError(f"MH mailbox of {self.layout.region_size} bytes does not fit "
                                f"its {len(region)}-byte mapping")
        for queue in range(self.layout.queue_count):
            slots = abi.MailboxLayout.unpack_queue(view, self._descriptor(queue))[2:4]
            if slots != (self.layout.slot_offset(queue, 0), self.layout.slot_offset(queue, 1)):
                raise ProtocolError(f"MH mailbox queue {queue} places its slots elsewhere")
        self.timeout = timeout
        self._region = region
        self._view = view
        words = REGION_HEADER_SIZE // 8 + QUEUE_DESC_SIZE // 8 * self.layout.queue_count
        self._words = np.frombuffer(region, dtype="<u8", count=words)
        self._irq = irq
        self._queues = [_Queue() for _ in range(self.layout.queue_count)]
        self._next_queue = 0
        for queue in range(self.layout.queue_count):
            self._resync(queue)

    def _resync(self, queue: int) -> None:
        """Carry on from the doorbell an earlier client left (an agent that died, then the
        orchestrator aborting its session): wait for the MH to answer what it posted."""
        doorbell = int(self._words[self._descriptor(queue) // 8])
        state = self._queues[queue]
        state.reserved = state.posted = doorbell
        if self._completion(queue) < doorbell:
            with contextlib.suppress(OSError):
                self._irq.send(bytes([queue]))
            self._await_completion(Ticket(queue, doorbell, memoryview(b"")), Command.HELLO)

    @classmethod
    def connect(cls, shared_path: str | Path, gpa: int, size: int, irq_path: str | Path, *,
                timeout: float = DEFAULT_TIMEOUT) -> MailboxClient:
        """Map the region at ``gpa`` of the guest-shared file and connect the interrupt line.

        :raises MigrationFailed: the file or the socket cannot be opened.
        """
        try:
            with open(shared_path, "r+b") as stream:
                region = mmap.mmap(stream.fileno(), size, offset=gpa)
        except (OSError, ValueError) as err:
            raise MigrationFailed(f"cannot map the MH mailbox at {gpa:#x} of {shared_path}: "
                                  f"{err}") from None
        irq = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            irq.connect(str(irq_path))
        except OSError as err:
            irq.close()
            region.close()
            raise MigrationFailed(f"cannot reach the MH's interrupt line {irq_path}: "
                                  f"{err.strerror or err}") from None
        try:
            return cls(region, irq, timeout=timeout)
        except ProtocolError:
            irq.close()
            region.close()
            raise

    @property
    def queue_count(self) -> int:
        """Queues (helper vCPUs) the MH serves."""
        return self.layout.queue_count

    @property
    def payload_capacity(self) -> int:
        """Most payload bytes one request or response can carry."""
        return self.layout.slot_capacity - HEADER_SIZE

    def reserve(self, queue: int | None = None) -> Ticket:
        """The next request on ``queue`` (round robin over the queues if None).

        The slot is the one of request ``n - 2``, whose response must have
        been read (:meth:`wait`) already: the double buffer allows two
        requests in flight per queue.
        """
        if queue is None:
            queue = self._next_queue
            self._next_queue = (queue + 1) % self.layout.queue_count
        state = self._queues[queue]
        if state.reserved != state.posted:
            raise RuntimeError(f"request {state.reserved} on MH queue {queue} is not posted yet")
        seq = state.reserved + 1
        if seq - 2 in state.waiting:
            raise RuntimeError(f"MH queue {queue}: the response to request {seq - 2} was not "
                               "read; its slot is still busy")
        state.reserved = seq
        return Ticket(queue, seq, self._slot(queue, seq)[HEADER_SIZE:])

    def post(self, ticket: Ticket, command: Command, length: int) -> None:
        """Ring the doorbell for ``ticket`` whose ``length`` payload bytes are in its slot."""
        state = self._queues[ticket.queue]
        if ticket.seq != state.reserved or ticket.seq == state.posted:
            raise RuntimeError(f"ticket {ticket} is not the queue's pending reservation")
        if length > self.payload_capacity:
            raise ValueError(f"{length} payload bytes exceed an MH slot")
        slot = self._slot(ticket.queue, ticket.seq)
        slot[:HEADER_SIZE] = abi.pack_request(abi.Request(command, ticket.seq))
        _U32.pack_into(slot, _REQUEST_LENGTH_AT, length)
        # One aligned 8-byte store: the release point of §1.3 (x86 keeps stores in order).
        self._words[self._descriptor(ticket.queue) // 8] = ticket.seq
        state.posted = ticket.seq
        state.waiting[ticket.seq] = command
        try:
            self._irq.send(bytes([ticket.queue]))
        except OSError as err:
            raise MigrationFailed(f"the MH's interrupt line broke: {err.strerror or err}"
                                  ) from None

    def submit(self, command: Command, payload: bytes = b"", queue: int | None = None) -> Ticket:
        """Reserve, copy ``payload`` in and post: for small (control) requests."""
        ticket = self.reserve(queue)
        ticket.payload[:len(payload)] = payload
        self.post(ticket, command, len(payload))
        return ticket

    def wait(self, ticket: Ticket) -> Reply:
        """Block until the MH answered ``ticket``; its response, read in place.

        :raises MigrationFailed: no answer within :attr:`timeout`.
        :raises ProtocolError: the answer is not a response to this request.
        """
        state = self._queues[ticket.queue]
        command = state.waiting.get(ticket.seq)
        if command is None:
            raise RuntimeError(f"ticket {ticket} is not waiting for a response")
        self._await_completion(ticket, command)
        del state.waiting[ticket.seq]
        slot = self._slot(ticket.queue, ticket.seq)
        (length,) = _U32.unpack_from(slot, _RESPONSE_LENGTH_AT)
        if length > self.payload_capacity:
            raise ProtocolError(f"the MH's response to {command.name} claims {length} bytes")
        header = bytearray(slot[:HEADER_SIZE])
        header[_RESPONSE_LENGTH_AT:_RESPONSE_LENGTH_AT + 4] = bytes(4)  # parsed without payload
        try:
            response = abi.unpack_response(header)
        except ValueError as err:
            raise ProtocolError(f"the MH's response to {command.name}: {err}") from None
        if (response.command, response.mailbox_seq) != (command, ticket.seq):
            raise ProtocolError(f"the MH answered command {response.command:#x} request "
                                f"{response.mailbox_seq} where {command.name} request "
                                f"{ticket.seq} was due")
        payload = slot[HEADER_SIZE:HEADER_SIZE + length]
        return Reply(command, response.status, response.detail, payload)

    def ask(self, command: Command, payload: bytes = b"", queue: int = 0) -> bytes:
        """One request, answered OK: the response payload (a copy).

        :raises MhRefused: the MH answered with another status.
        """
        return bytes(self.wait(self.submit(command, payload, queue)).ok())

    def close(self) -> None:
        """Hang up the interrupt line and unmap the region (no view of it may remain)."""
        self._irq.close()
        del self._words
        self._view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a slot view
            self._region.close()

    def __enter__(self) -> MailboxClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    @staticmethod
    def _descriptor(queue: int) -> int:
        return REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE

    def _slot(self, queue: int, seq: int) -> memoryview:
        start = self.layout.slot_offset(queue, seq % 2)
        return self._view[start:start + self.layout.slot_capacity]

    def _completion(self, queue: int) -> int:
        return int(self._words[self._descriptor(queue) // 8 + 1])

    def _await_completion(self, ticket: Ticket, command: Command) -> None:
        """Sleep on the interrupt line until the queue's completion word reaches the ticket.

        Any message is only a hint to look again: stale or spurious bytes,
        or another queue's, cost one more look.
        """
        deadline = time.monotonic() + self.timeout
        posted = self._queues[ticket.queue].posted
        while True:
            completion = self._completion(ticket.queue)
            if completion > posted:
                raise ProtocolError(f"MH queue {ticket.queue} claims request {completion} "
                                    f"answered, only {posted} were posted")
            if completion >= ticket.seq:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationFailed(f"the MH did not answer {command.name} (queue "
                                      f"{ticket.queue}, request {ticket.seq}) within "
                                      f"{self.timeout:g} s")
            self._irq.settimeout(remaining)
            try:
                message = self._irq.recv(_IRQ_READ)
            except TimeoutError:
                continue
            except OSError as err:
                raise MigrationFailed(f"the MH's interrupt line broke: {err.strerror or err}"
                                      ) from None
            if not message:
                raise MigrationFailed("the MH hung up its interrupt line")
