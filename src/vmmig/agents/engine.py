"""The generic precopy engine on the emulated platform: one loop per agent.

The source loop sends every page, then the pages the kernel's dirty log
reports, round after round, until :class:`~vmmig.core.precopy.PrecopyPolicy`
says stop; then it stops the guest, sends what is left and the vCPU state,
and waits for the target to acknowledge.  The target loop writes what
arrives into its machine's RAM and loads the vCPU state.  Both talk to their
machine over QMP (synchronously: an agent's data path is one thread) and to
each other over a :class:`~vmmig.channel.Channel`.

The page path is pluggable (:class:`SourcePages`, :class:`TargetPages`):
by default the ``plain`` one (the agents map guest RAM, as a hypervisor
may); confidential technologies pass their own, which seals on the source
and opens on the target.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs
import numpy as np

from vmmig.agents.pages import PageBatcher, PageReceiver, prefault, ram_pages
from vmmig.channel import Channel, FrameKind
from vmmig.channel.frames import FrameHeader, ProtocolError
from vmmig.channel.stream import ChannelClosed
from vmmig.core.precopy import PrecopyLimits, PrecopyPolicy, Reason, RoundResult, pacing_delay
from vmmig.errors import MigrationFailed


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = ["MachineMonitor", "PipelinedPages", "RoundStats", "SealedCpuState",
           "SealedCpuStateReceiver", "SourceEngine", "SourcePages", "SourceResult",
           "TargetPages", "run_source", "run_target"]

PAGE = 4096
#: How many batches ahead a pipelined page path is told about.
PREFETCH_BATCHES = 8
#: How long a source whose stream broke waits for the target's ABORT frame.
ABORT_REASON_TIMEOUT = 2.0


class SourcePages(Protocol):
    """How the source turns dirty pages into PAGES frames (a technology's page path)."""

    #: Most pages one frame carries.
    batch_pages: int
    #: Pages sent with contents, and zero pages sent without, so far.
    normal: int
    zero: int

    def batch(self, page_numbers: np.ndarray) -> Sequence[Buffer]:
        """The payload parts of one PAGES frame for these pages (valid until the next call)."""


@runtime_checkable
class PipelinedPages(Protocol):
    """What a source page path may add (the MH's does): a RAM bound and early starts.

    A path that seals in another agent of the guest (the MH on its helper
    vCPU) wants the next batches before it is asked for them, so that it
    seals while the channel sends.
    """

    #: Pages at and above this are not the path's to send (the MH's own mailbox).
    ram_pages: int

    def prefetch(self, upcoming: Sequence[np.ndarray]) -> None:
        """The batches :meth:`SourcePages.batch` will be asked for next, in order.

        Called before each ``batch``; the list starts with that call's batch.
        """


@runtime_checkable
class SealedCpuState(Protocol):
    """A page path that moves the vCPUs' state too (SEV-ES: sealed by the MH, because the
    hypervisor can neither read nor set the registers); only if ``sealed_cpu_state``."""

    sealed_cpu_state: bool

    def cpu_state_records(self) -> Iterator[Buffer]:
        """Source: one CPU_STATE frame's payload per vCPU (each valid until the next)."""
        ...


@runtime_checkable
class SealedCpuStateReceiver(Protocol):
    """The target's half of :class:`SealedCpuState`."""

    sealed_cpu_state: bool

    def receive_cpu_state(self, channel: Channel, header: FrameHeader) -> None:
        """Receive a CPU_STATE frame and hand it to whoever checks it."""
        ...


class TargetPages(Protocol):
    """How the target applies a PAGES frame (a technology's page path)."""

    def receive(self, channel: Channel, header: FrameHeader) -> int:
        """Receive the frame's payload and apply it; returns the pages it wrote.

        :raises ProtocolError: the payload is malformed or not authentic.
        """


class MachineMonitor(Protocol):
    """The QMP client an agent drives its machine with (qemu.qmp's legacy client fits)."""

    def cmd(self, cmd: str, **kwds: object) -> Any:  # noqa: ANN401 - QMP returns JSON
        """Execute a command and return its ``return`` value; raise on error."""


@attrs.frozen
class RoundStats:
    """One finished round, for progress and the report."""

    number: int
    pages: int
    sent_bytes: int
    seconds: float
    dirty_pages: int
    reason: Reason
    throttle: int = 0


@attrs.frozen
class SourceResult:
    """What the source loop did."""

    rounds: tuple[RoundStats, ...]
    normal: int
    zero: int
    sent_bytes: int
    downtime: float
    total_pages: int
    #: The part of ``downtime`` that sent the last pages (the rest moved the vCPU state).
    memory_downtime: float = 0.0


def _map(path: str, size: int, *, writable: bool) -> mmap.mmap:
    with open(path, "r+b" if writable else "rb") as stream:
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        mapping = mmap.mmap(stream.fileno(), size, access=access)
    prefault(mapping, writable=writable)
    return mapping


def _sync_dirty(monitor: MachineMonitor, dirty_file: mmap.mmap) -> np.ndarray:
    """Collect the machine's dirty log and return the dirty page numbers (a copy)."""
    count = int(monitor.cmd("x-dirty-log-sync")["dirty"])
    return np.frombuffer(dirty_file, dtype="<u8", count=count).astype(np.uint64)


def _abort_reason(channel: Channel) -> str | None:
    """Why the target closed the channel, if it said so (an ABORT frame) in time."""
    channel.sock.settimeout(ABORT_REASON_TIMEOUT)
    try:
        kind, message = channel.receive_json()
    except (ChannelClosed, OSError, ProtocolError):
        return None
    return str(message.get("reason")) if kind is FrameKind.ABORT else None


@contextlib.contextmanager
def _target_reason(channel: Channel) -> Iterator[None]:
    """A stream the target broke off becomes :class:`MigrationFailed` with its reason."""
    try:
        yield
    except ChannelClosed:
        reason = _abort_reason(channel)
        if reason is None:
            raise
        raise MigrationFailed(f"target: {reason}") from None


def _send_pages(channel: Channel, batcher: SourcePages, pages: np.ndarray, *,
                bandwidth_cap: float = 0.0, started: float = 0.0) -> int:
    """Send ``pages`` in batches, keeping the channel within the cap since ``started``.

    :return: the bytes sent.
    """
    before = channel.bytes_sent
    step = batcher.batch_pages
    pipelined = batcher if isinstance(batcher, PipelinedPages) else None
    if pipelined is not None:
        pages = pages[pages < pipelined.ram_pages]
    for start in range(0, len(pages), step):
        if pipelined is not None:
            ahead = range(start, min(len(pages), start + PREFETCH_BATCHES * step), step)
            pipelined.prefetch([pages[at:at + step] for at in ahead])
        channel.send(FrameKind.PAGES, *batcher.batch(pages[start:start + step]))
        delay = pacing_delay(channel.bytes_sent, time.monotonic() - started, bandwidth_cap)
        if delay:
            time.sleep(delay)  # the bandwidth cap: sending now would exceed it
    return channel.bytes_sent - before


class SourceEngine:
    """The source side, in the steps the migration's phases drive.

    :meth:`precopy` runs rounds until the policy says stop, :meth:`stop_and_copy`
    pauses the guest and sends what is still dirty, :meth:`finish` sends the
    vCPU state and waits for the target's acknowledgement.  Between the steps
    the guest keeps running (after :meth:`precopy`) or stays paused.
    """

    def __init__(self, monitor: MachineMonitor, channel: Channel, limits: PrecopyLimits, *,
                 pages: SourcePages | None = None,
                 on_round: Callable[[RoundStats], None] = lambda _r: None) -> None:
        """:param pages: the page path; by default plain's, from the mapped RAM."""
        memory = monitor.cmd("x-query-memory")
        if pages is None and memory["ram-path"] is None:
            raise MigrationFailed("the source's RAM is private (encrypted): plain cannot read it")
        self.monitor = monitor
        self.channel = channel
        self.limits = limits
        self.on_round = on_round
        size = int(memory["size"])
        self.total_pages = size // PAGE
        monitor.cmd("x-dirty-log-start")
        self._dirty_file = _map(memory["dirty-pages-path"], self.total_pages * 8,
                                writable=False)
        if pages is None:
            pages = PageBatcher(ram_pages(_map(memory["ram-path"], size, writable=False)))
        self.batcher = pages
        self.rounds: list[RoundStats] = []
        self._dirty = np.arange(self.total_pages, dtype=np.uint64)
        self._stopped_at = self._memory_sent_at = 0.0

    def precopy(self) -> RoundStats:
        """Send rounds while the guest runs, until the policy stops; returns the last round.

        :raises MigrationFailed: the target stopped the stream, with its reason.
        """
        with _target_reason(self.channel):
            return self._precopy()

    def _precopy(self) -> RoundStats:
        policy = PrecopyPolicy(self.limits)
        started = time.monotonic()
        while True:
            round_start = time.monotonic()
            sent = _send_pages(self.channel, self.batcher, self._dirty,
                               bandwidth_cap=self.limits.bandwidth_cap, started=started)
            pages = len(self._dirty)
            self._dirty = _sync_dirty(self.monitor, self._dirty_file)
            seconds = time.monotonic() - round_start
            decision = policy.round_done(RoundResult(sent, seconds, len(self._dirty)))
            if decision.throttle != (self.rounds[-1].throttle if self.rounds else 0):
                self.monitor.cmd("x-cpu-throttle", percentage=decision.throttle)
            stats = RoundStats(len(self.rounds) + 1, pages, sent, seconds, len(self._dirty),
                               decision.reason, decision.throttle)
            self.rounds.append(stats)
            self.channel.send_json(FrameKind.ROUND_END, {"round": stats.number})
            self.on_round(stats)
            if decision.stop_source:
                return stats

    def stop_and_copy(self) -> int:
        """Pause the guest and send every page still dirty; returns how many.

        :raises MigrationFailed: the target stopped the stream, with its reason.
        """
        with _target_reason(self.channel):
            return self._stop_and_copy()

    def _stop_and_copy(self) -> int:
        self._stopped_at = time.monotonic()
        self.monitor.cmd("stop")
        last = _sync_dirty(self.monitor, self._dirty_file)
        pages = np.union1d(self._dirty, last)
        # Stop-and-copy runs at full speed: the guest is down.
        _send_pages(self.channel, self.batcher, pages)
        self._memory_sent_at = time.monotonic()
        return len(pages)

    def finish(self) -> SourceResult:
        """Send the vCPU state and wait until the target holds the whole guest.

        :raises MigrationFailed: the target aborted or did not acknowledge.
        """
        pages = self.batcher
        if isinstance(pages, SealedCpuState) and pages.sealed_cpu_state:
            for record in pages.cpu_state_records():
                self.channel.send(FrameKind.CPU_STATE, record)
        else:
            cpu_state = self.monitor.cmd("x-vcpu-state-export")
            self.channel.send(FrameKind.CPU_STATE, json.dumps(cpu_state).encode())
        self.channel.send_json(FrameKind.DONE, {})
        kind, message = self.channel.receive_json()
        if kind is not FrameKind.DONE:
            raise MigrationFailed(f"target: {message.get('reason', kind.name)}")
        return SourceResult(tuple(self.rounds), self.batcher.normal, self.batcher.zero,
                            self.channel.bytes_sent, time.monotonic() - self._stopped_at,
                            self.total_pages, self._memory_sent_at - self._stopped_at)

    def close(self) -> None:
        """Stop dirty logging and the guest's throttle (the mappings go with their last view)."""
        self.monitor.cmd("x-dirty-log-stop")
        if self.rounds and self.rounds[-1].throttle:
            self.monitor.cmd("x-cpu-throttle", percentage=0)


def run_source(monitor: MachineMonitor, channel: Channel, limits: PrecopyLimits, *,
               pages: SourcePages | None = None,
               on_round: Callable[[RoundStats], None] = lambda _r: None) -> SourceResult:
    """Migrate the source machine's guest through ``channel``; the guest ends stopped.

    :raises MigrationFailed: the target aborted or did not acknowledge.
    """
    engine = SourceEngine(monitor, channel, limits, pages=pages, on_round=on_round)
    try:
        engine.precopy()
        engine.stop_and_copy()
        return engine.finish()
    finally:
        engine.close()


def _receive_frame(monitor: MachineMonitor, channel: Channel, receiver: TargetPages,
                   header: FrameHeader) -> int:
    """Receive and apply one frame on the target; returns the pages it wrote."""
    if header.kind is FrameKind.PAGES:
        return receiver.receive(channel, header)
    if header.kind is FrameKind.CPU_STATE and isinstance(receiver, SealedCpuStateReceiver) \
            and receiver.sealed_cpu_state:
        receiver.receive_cpu_state(channel, header)
        return 0
    kind, payload = header.kind, channel.receive_payload(header)
    if kind is FrameKind.CPU_STATE:
        monitor.cmd("x-vcpu-state-import", vmsas=json.loads(bytes(payload)))
    elif kind is FrameKind.ABORT:
        raise MigrationFailed(f"source aborted: {json.loads(bytes(payload))}")
    elif kind is not FrameKind.ROUND_END:
        raise ProtocolError(f"unexpected {kind.name} frame on the target")
    return 0


def run_target(monitor: MachineMonitor, channel: Channel, pages: TargetPages | None = None
               ) -> int:
    """Receive a guest into the (incoming) target machine; returns the pages written.

    :param pages: the page path; by default plain's, into the mapped RAM.

    On a malformed stream the target tells the source why (ABORT) and raises.
    """
    if pages is None:
        memory = monitor.cmd("x-query-memory")
        ram = _map(memory["ram-path"], int(memory["size"]), writable=True)
        pages = PageReceiver(ram_pages(ram, writable=True))
    receiver = pages
    written = 0
    try:
        while True:
            header = channel.receive_header()
            if header.kind is FrameKind.DONE:
                channel.receive_payload(header)
                channel.send_json(FrameKind.DONE, {"pages": written})
                return written
            written += _receive_frame(monitor, channel, receiver, header)
    except ProtocolError as err:
        channel.send_json(FrameKind.ABORT, {"reason": str(err)})
        raise
