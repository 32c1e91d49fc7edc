"""The Migration Handler's page path: the host moves sealed records, never pages.

On the source, :class:`MhSourcePages` turns each batch of dirty page numbers
into one EXPORT_PAGES request; the MH's sealed page record is the PAGES
frame's payload, sent straight from the mailbox slot.  On the target,
:class:`MhTargetPages` receives the frame straight into a slot and posts it
as IMPORT_PAGES.  Neither agent sees plaintext or learns which pages are
zero (a record's size depends on its page count only), so ``zero`` stays 0.

Pipelining, because sealing and the channel are both slow enough to matter:
the source posts the next batches (:meth:`MhSourcePages.prefetch`) before it
hands out record *k*, so the MH seals while the channel sends; the target
reads record *k* into one slot while the MH opens record *k - 1* from the
other and collects a result two records later (:meth:`MhTargetPages.flush`
collects the last ones).
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import numpy as np

from vmmig.agents.mh_mailbox import MailboxClient, Reply, Ticket
from vmmig.channel import Channel
from vmmig.channel.frames import FrameHeader, ProtocolError
from vmmig.firmware.abi import PAGE_SIZE, Command, VcpuIndex, pack_export_request


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = ["MhSourcePages", "MhTargetPages"]

#: A record's plaintext header up to its sequence number and entry count (ABI §4.2).
_RECORD_SEQ: Final = struct.Struct("<40xQI")
#: IMPORT_PAGES' reply: record sequence, pages written, reserved (ABI §3.4).
_IMPORT_REPLY: Final = struct.Struct("<QI4x")


@attrs.define
class _Export:
    """One EXPORT_PAGES in the source's window."""

    ticket: Ticket
    reply: Reply | None = None
    record_seq: int = -1
    pages: int = 0
    sent: bool = False


class MhSourcePages:
    """The source's page path through its MH (a :class:`~vmmig.agents.engine.SourcePages`).

    :param client: the source MH's mailbox.
    :param batch_pages: pages per record (the smaller of both MHs' max batch).
    :param ram_pages: the MH's guest memory (HELLO): pages at and above it
        (the mailbox reservation) are not exported.

    Batches go round robin over the MH's queues, up to two in flight per
    queue.  An MH may answer queues in any order, and records carry the
    sequence number the MH gave them, so records are handed out in that
    order, which is the order the target's MH accepts.
    """

    def __init__(self, client: MailboxClient, *, batch_pages: int, ram_pages: int,
                 vcpus: int = 0) -> None:
        self.client = client
        self.batch_pages = batch_pages
        self.ram_pages = ram_pages
        #: The MH seals the vCPUs' state too (SEV-ES), for this many vCPUs.
        self.vcpus = vcpus
        self.sealed_cpu_state = vcpus > 0
        self.normal = 0
        #: Always 0: which pages are zero is sealed inside the records.
        self.zero = 0
        self._window: deque[_Export] = deque()
        self._capacity = 2 * client.queue_count
        self._ahead = 0  # batches posted by prefetch() that batch() has not been asked for
        self._handed_out: _Export | None = None
        self._next_record = 0

    def prefetch(self, upcoming: Sequence[np.ndarray]) -> None:
        """Start on the batches :meth:`batch` will be asked for next, in that order."""
        self._release()
        for pages in upcoming[self._ahead:]:
            if len(self._window) >= self._capacity:
                break
            self._post(pages)
            self._ahead += 1

    def batch(self, page_numbers: np.ndarray) -> Sequence[Buffer]:
        """The next sealed record, as one PAGES payload part (valid until the next call)."""
        self._release()
        if self._ahead:
            self._ahead -= 1
        else:
            self._post(page_numbers)
        export = self._record(self._next_record)
        self._next_record += 1
        self._handed_out = export
        self.normal += export.pages
        assert export.reply is not None
        return [export.reply.payload]

    def cpu_state_records(self) -> Iterator[Buffer]:
        """After the last batch: every vCPU's sealed state, in the stream's order (the
        records share the pages' sequence), each valid until the next."""
        for index in range(self.vcpus):
            self._release()
            self._window.append(_Export(self.client.submit(Command.EXPORT_CPU_STATE,
                                                           VcpuIndex(index).pack())))
            export = self._record(self._next_record)
            self._next_record += 1
            self._handed_out = export
            assert export.reply is not None
            yield export.reply.payload
        self._release()

    def drain(self) -> None:
        """Collect every export still in flight, whatever the MH answered: their slots
        must be free before ABORT goes through the same queues."""
        for export in self._window:
            if export.reply is None:
                export.reply = self.client.wait(export.ticket)
        self._window.clear()
        self._handed_out = None
        self._ahead = 0

    def _post(self, pages: np.ndarray) -> None:
        if len(pages) > self.batch_pages:
            raise ValueError(f"{len(pages)} pages exceed the MH's batch of {self.batch_pages}")
        payload = pack_export_request(np.asarray(pages, dtype=np.uint64) * PAGE_SIZE)
        self._window.append(_Export(self.client.submit(Command.EXPORT_PAGES, payload)))

    def _release(self) -> None:
        """The record handed out last was sent: free the oldest slots that are done."""
        if self._handed_out is not None:
            self._handed_out.sent = True
            self._handed_out = None
        while self._window and self._window[0].sent:
            self._window.popleft()

    def _record(self, seq: int) -> _Export:
        """The window's export that holds record ``seq``, collecting replies oldest first."""
        for export in self._window:
            if export.reply is None:
                export.reply = self.client.wait(export.ticket)
                record = export.reply.ok()
                if len(record) < _RECORD_SEQ.size:
                    raise ProtocolError("the MH's EXPORT_PAGES reply is not a page record")
                export.record_seq, export.pages = _RECORD_SEQ.unpack_from(record)
            if export.record_seq == seq and not export.sent:
                return export
        raise ProtocolError(f"the MH sealed no record {seq} among its last {len(self._window)}")


class MhTargetPages:
    """The target's page path through its MH (a :class:`~vmmig.agents.engine.TargetPages`).

    Imports use one queue: the MH must open records in their sequence order,
    and one queue is answered in order (two queues could be served either way
    round, and an MH refuses a record that skips ahead).

    :param client: the target MH's mailbox.
    :param queue: the queue imports go through.
    """

    def __init__(self, client: MailboxClient, queue: int = 0, *,
                 sealed_cpu_state: bool = False) -> None:
        self.client = client
        self.queue = queue
        #: CPU_STATE frames are the MH's sealed records (SEV-ES), imported like pages.
        self.sealed_cpu_state = sealed_cpu_state
        self._pending: deque[tuple[Ticket, Command]] = deque()

    def receive(self, channel: Channel, header: FrameHeader) -> int:
        """Receive a record into a slot and post it; returns pages of earlier imports done.

        :raises ProtocolError: the frame does not fit a slot, or the MH
            refused an earlier record (:class:`~vmmig.agents.mh_mailbox.MhRefused`
            names its status).
        """
        return self._import(channel, header, Command.IMPORT_PAGES)

    def receive_cpu_state(self, channel: Channel, header: FrameHeader) -> None:
        """Receive a vCPU's sealed state into a slot and post it, in the stream's order."""
        self._import(channel, header, Command.IMPORT_CPU_STATE)

    def _import(self, channel: Channel, header: FrameHeader, command: Command) -> int:
        written = self._collect() if len(self._pending) == 2 else 0
        if header.length > self.client.payload_capacity:
            raise ProtocolError(f"{header.kind.name} frame of {header.length} bytes is larger "
                                "than an MH record")
        ticket = self.client.reserve(self.queue)
        channel.receive_into(ticket.payload[:header.length])
        self.client.post(ticket, command, header.length)
        self._pending.append((ticket, command))
        return written

    def flush(self) -> int:
        """Wait for every posted import; returns the pages they wrote.

        :raises ProtocolError: the MH refused one of them.
        """
        written = 0
        while self._pending:
            written += self._collect()
        return written

    def drain(self) -> None:
        """Collect every posted import whatever the MH answered (before ABORT on the queue)."""
        while self._pending:
            with contextlib.suppress(ProtocolError):
                self._collect()

    def _collect(self) -> int:
        ticket, command = self._pending.popleft()
        reply = self.client.wait(ticket).ok()
        if command is Command.IMPORT_CPU_STATE:
            return 0
        if len(reply) != _IMPORT_REPLY.size:
            raise ProtocolError("the MH's IMPORT_PAGES reply has the wrong size")
        _seq, pages = _IMPORT_REPLY.unpack(reply)
        return int(pages)
