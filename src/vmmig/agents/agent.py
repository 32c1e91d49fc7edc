"""An agent process (``vmmig agent source|target``): one side of a migration's data path.

The orchestrator starts one agent per side.  An agent drives its machine
over QMP, talks to its peer over the channel, and to the orchestrator in
JSON lines: events on stdout, commands on stdin.  The control protocol::

    target -> {"event": "listening", "address": "tcp:127.0.0.1:40123"}
    target -> {"event": "received", "pages": N}        the guest is in; exit 0
    source -> {"event": "ready"}                        connected to the target; waits:
           <- {"cmd": "migrate"}                        start dirty logging and rounds
    source -> {"event": "started"}                      dirty logging runs
    source -> {"event": "round", ...}                   one per precopy round
    source -> {"event": "converged", "reason": R}       waits for a command:
           <- {"cmd": "stop"}                           pause the guest, send the rest
    source -> {"event": "stopped", "pages": N}          waits for a command:
           <- {"cmd": "finish"}                         send vCPU state, await the ack
    source -> {"event": "sent", ...}                    totals
    source -> {"event": "done"}                         exit 0
    either -> {"event": "error", "message": M}          exit 1

With ``--page-path mh`` (both agents) the machines' Migration Handlers move
the pages as sealed records (:mod:`vmmig.agents.mh_session`): the source
opens the MH session after ``migrate`` and before ``started``.  After
``received`` the target waits for the source's manifest; the source, after
``sent``, and the target, after ``verified``, wait for the orchestrator::

    source <- {"cmd": "seal"}
    source -> {"event": "manifest"}       its MH sealed the manifest; from here the
                                          source resumes only on the target's abort token
    target -> {"event": "verified"}       its MH checked the manifest against what it holds
    target <- {"cmd": "commit"}
    target -> {"event": "committed"}      its MH committed: the guest lives here now; exit 0
    source -> {"event": "committed"}      the target's receipt retired the source's MH;
                                          then "done"

A target that gets anything but ``commit`` aborts its MH and sends the
source its abort token, so the sealed source can resume.

An ``error`` from a source whose MH is sealed without a token says that the
source must not resume.

Anything but the expected command (or end of input: the orchestrator is
gone) aborts: the source tells the target, and exits leaving its guest as it
is (the orchestrator resumes it).  The agent never resumes a guest itself.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import attrs
from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmmig.agents.engine import RoundStats, SourceEngine, SourcePages, run_target
from vmmig.agents.mh_session import SourceSession, open_mailbox, receive_guest
from vmmig.agents.psp_pages import PspSourcePages, PspTargetPages
from vmmig.channel import Channel, FrameKind, connect, listen
from vmmig.core.precopy import PrecopyLimits
from vmmig.errors import MigrationFailed, VmmigError


__all__ = ["AgentOptions", "run_agent"]

#: How long the target waits for the source to connect.
ACCEPT_TIMEOUT = 60.0


@attrs.frozen(kw_only=True)
class AgentOptions:
    """What ``vmmig agent`` was asked to do.

    :ivar role: ``source`` or ``target``.
    :ivar qmp: the machine's QMP socket.
    :ivar address: where the target listens, or where the source connects.
    :ivar limits: the source's precopy limits.
    :ivar page_path: ``plain`` (the agents map guest RAM), ``mh`` (the guests'
        Migration Handlers seal and open the pages) or ``psp`` (the machines' PSPs
        do, one SEND/RECEIVE_UPDATE_DATA per page).
    """

    role: str = attrs.field(validator=attrs.validators.in_(("source", "target")))
    qmp: str
    address: str
    limits: PrecopyLimits | None = None
    page_path: str = attrs.field(default="plain",
                                 validator=attrs.validators.in_(("plain", "mh", "psp")))


class _Control:
    """The JSON-lines conversation with the orchestrator."""

    def __init__(self, events: IO[str], commands: IO[str]) -> None:
        self._events = events
        self._commands = commands

    def emit(self, event: str, **data: object) -> None:
        self._events.write(json.dumps({"event": event, **data}) + "\n")
        self._events.flush()

    def expect(self, command: str) -> None:
        line = self._commands.readline()
        if not line:
            raise MigrationFailed("the orchestrator is gone (end of input)")
        got = json.loads(line).get("cmd")
        if got != command:
            raise MigrationFailed(f"orchestrator said {got!r} instead of {command!r}")


@contextmanager
def _monitor(path: str) -> Iterator[QEMUMonitorProtocol]:
    monitor = QEMUMonitorProtocol(path)
    monitor.connect()
    try:
        yield monitor
    finally:
        monitor.close()


def run_agent(options: AgentOptions, events: IO[str] = sys.stdout,
              commands: IO[str] = sys.stdin) -> int:
    """Run one agent to the end; returns the exit status (errors are reported as events)."""
    control = _Control(events, commands)
    try:
        with _monitor(options.qmp) as monitor:
            if options.role == "target":
                _target(options, monitor, control)
            else:
                _source(options, monitor, control)
    except EOFError:  # the legacy QMP client's word for a closed connection
        control.emit("error", message="lost the QMP connection to its machine (did it exit?)")
        return 1
    except (VmmigError, QMPError, OSError) as err:
        control.emit("error", message=str(err) or type(err).__name__)
        return 1
    except Exception as err:  # a bug: still one line for the orchestrator, not a traceback
        control.emit("error", message=f"{type(err).__name__}: {err}")
        return 1
    return 0


def _target(options: AgentOptions, monitor: QEMUMonitorProtocol, control: _Control) -> None:
    server = listen(options.address)
    with server:
        control.emit("listening", address=_bound_address(options.address, server.getsockname()))
        server.settimeout(ACCEPT_TIMEOUT)
        try:
            sock, _ = server.accept()
        except TimeoutError:
            raise MigrationFailed(f"no source connected within {ACCEPT_TIMEOUT:.0f} s") from None
    sock.settimeout(None)
    with Channel(sock) as channel:
        if options.page_path == "mh":
            with open_mailbox(monitor) as client:
                receive_guest(monitor, client, channel, control.emit,
                              lambda: control.expect("commit"))
        else:
            pages = PspTargetPages(monitor) if options.page_path == "psp" else None
            control.emit("received", pages=run_target(monitor, channel, pages))


def _bound_address(requested: str, name: Any) -> str:  # noqa: ANN401 (a socket address)
    if requested.startswith("tcp:"):
        host, port = name[:2]
        return f"tcp:{host}:{port}"
    return requested


def _round_event(stats: RoundStats) -> dict[str, object]:
    return {"number": stats.number, "pages": stats.pages, "sent-bytes": stats.sent_bytes,
            "seconds": stats.seconds, "dirty-pages": stats.dirty_pages,
            "reason": stats.reason.value, "throttle": stats.throttle}


def _source(options: AgentOptions, monitor: QEMUMonitorProtocol, control: _Control) -> None:
    assert options.limits is not None
    with connect(options.address) as channel, contextlib.ExitStack() as mailbox:
        control.emit("ready")
        control.expect("migrate")
        session = None
        pages: SourcePages | None = None
        if options.page_path == "mh":
            vcpus = monitor.cmd("query-cpus-fast")
            if not isinstance(vcpus, list):
                raise MigrationFailed("the machine's query-cpus-fast returned no list")
            session = SourceSession.open(mailbox.enter_context(open_mailbox(monitor)), channel,
                                         vcpus=len(vcpus))
            pages = session.pages
        elif options.page_path == "psp":
            pages = PspSourcePages(monitor)
        engine = SourceEngine(monitor, channel, options.limits, pages=pages)
        engine.on_round = lambda stats: control.emit("round", **_round_event(stats),
                                                     normal=engine.batcher.normal,
                                                     zero=engine.batcher.zero)
        control.emit("started")
        try:
            last = engine.precopy()
            control.emit("converged", reason=last.reason.value)
            control.expect("stop")
            stop_started = time.monotonic()
            copied = engine.stop_and_copy()
            control.emit("stopped", pages=copied, seconds=time.monotonic() - stop_started)
            control.expect("finish")
            result = engine.finish()
            control.emit("sent", normal=result.normal, zero=result.zero,
                         **{"sent-bytes": result.sent_bytes, "downtime": result.downtime,
                            "downtime-memory": result.memory_downtime,
                            "total-pages": result.total_pages})
            if session is not None:
                control.expect("seal")
                session.commit(control.emit)
        except BaseException as err:
            # Tell the target why, if the channel still carries anything.
            with contextlib.suppress(OSError, VmmigError):
                channel.send_json(FrameKind.ABORT, {"reason": str(err)})
            if session is not None:
                raise MigrationFailed(session.abort(err)) from err
            raise
        finally:
            # Cleanup only: a machine that is gone has no dirty log left to stop.
            with contextlib.suppress(QMPError, OSError):
                engine.close()
    control.emit("done")
