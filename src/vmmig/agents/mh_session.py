"""An MH migration's session over the agents' channel: handshake, page path, end game.

Each agent drives its own machine's MH through the mailbox and relays what
the MHs say to each other as CONTROL frames (JSON, byte strings in hex)::

    source MH: HELLO, OPEN_SESSION(source, 0)      -> Ns
    source -> {"mh": "open", "nonce": Ns, "max-batch": B, "ram-pages": P}
    target MH: HELLO, OPEN_SESSION(target, Ns)     -> Nt, session id (open)
    target -> {"mh": "open", "nonce": Nt, "session": S, "max-batch": B, "ram-pages": P}
    source MH: OPEN_SESSION(source, Nt)            -> session id (open); must equal S
    ... PAGES frames: sealed page records (:mod:`vmmig.agents.mh_pages`) ...
    ... CPU_STATE, DONE, DONE: the engine's end of the stream ...
    source MH: MANIFEST                            -> sealed manifest
    source -> {"mh": "manifest", "record": M}
    target MH: MANIFEST(M) (verify), COMMIT        -> sealed receipt; the target is the guest
    target -> {"mh": "receipt", "record": R}
    source MH: COMMIT(R)                           -> retired: this copy never runs again

A target that fails before its commit aborts its MH and sends ABORT with
the reason and its MH's sealed abort token (``"token"``, hex, may be empty);
the source's MH needs that token to abort once it has produced its
manifest, since the manifest let the target commit.  Nothing here is
trusted: the MHs check every record; the agents only move them and report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final

import attrs
from qemu.qmp import QMPError

from vmmig.agents.engine import MachineMonitor, run_target
from vmmig.agents.mh_mailbox import DEFAULT_TIMEOUT, MailboxClient, MhRefused
from vmmig.agents.mh_pages import MhSourcePages, MhTargetPages
from vmmig.channel import Channel, FrameKind
from vmmig.channel.frames import ProtocolError
from vmmig.channel.stream import ChannelClosed
from vmmig.errors import MigrationFailed, VmmigError
from vmmig.firmware.abi import (
    ABI_VERSION,
    Capability,
    Command,
    HelloReply,
    HelloRequest,
    OpenSessionReply,
    OpenSessionRequest,
    Role,
)
from vmmig.firmware.states import MhState


__all__ = ["Emit", "SourceSession", "abort_mh", "open_mailbox", "receive_guest"]

#: What the host needs from an MH (CPU_STATE is not: v1 migrates SEV, not SEV-ES).
REQUIRED: Final = Capability.BATCH | Capability.RECEIPTS
#: Agent events: ``emit("committed")``.
Emit = Callable[..., None]


def open_mailbox(monitor: MachineMonitor, timeout: float = DEFAULT_TIMEOUT) -> MailboxClient:
    """Reach the machine's MH: start its helper vCPU if it is not running, map its mailbox.

    :raises MigrationFailed: the MH does not run (the machine's reason).
    """
    info = monitor.cmd("x-query-mh")
    if info["state"] == "stopped":
        try:
            monitor.cmd("x-mh-start")
        except QMPError as err:
            # The orchestrator's helper step may have started it meanwhile.
            info = monitor.cmd("x-query-mh")
            if info["state"] != "running":
                raise MigrationFailed(f"the MH did not start: {err}") from err
        else:
            info = monitor.cmd("x-query-mh")
    return MailboxClient.connect(info["shared-path"], int(info["mailbox-gpa"]),
                                 int(info["mailbox-size"]), info["irq-path"], timeout=timeout)


def _hello(client: MailboxClient) -> HelloReply:
    """HELLO: the MH speaks v1, has what we need, and no session is left over."""
    reply = HelloReply.unpack(client.ask(Command.HELLO,
                                         HelloRequest(ABI_VERSION, int(REQUIRED)).pack()))
    missing = Capability(REQUIRED & ~reply.capabilities)
    if missing:
        raise MigrationFailed(f"the MH lacks {missing!r}")
    if reply.state != MhState.IDLE:
        raise MigrationFailed(f"the MH is in state {MhState(reply.state).name}, not idle: "
                              "another migration session is open")
    return reply


def _open(client: MailboxClient, role: Role, peer_nonce: bytes | None = None
          ) -> OpenSessionReply:
    request = OpenSessionRequest(role) if peer_nonce is None else OpenSessionRequest(
        role, peer_nonce)
    return OpenSessionReply.unpack(client.ask(Command.OPEN_SESSION, request.pack()))


def _expect(channel: Channel, step: str, peer: str) -> dict[str, Any]:
    """The ``peer``'s next CONTROL message for ``step``; its ABORT becomes MigrationFailed."""
    kind, message = channel.receive_json()
    if kind is FrameKind.ABORT:
        raise _PeerAborted(f"{peer}: {message.get('reason')}",
                           _hex(message, "token", optional=True))
    if kind is not FrameKind.CONTROL or message.get("mh") != step:
        raise ProtocolError(f"expected the MH {step!r} message, got {kind.name} {message}")
    return message


def _hex(message: dict[str, Any], field: str, *, optional: bool = False) -> bytes:
    value = message.get(field, "" if optional else None)
    try:
        return bytes.fromhex(value) if isinstance(value, str) else bytes.fromhex("?")
    except ValueError:
        raise ProtocolError(f"MH message field {field!r} is not hex") from None


def _int(message: dict[str, Any], field: str) -> int:
    value = message.get(field)
    if not isinstance(value, int) or value <= 0:
        raise ProtocolError(f"MH message field {field!r} is not a positive integer")
    return value


class _PeerAborted(MigrationFailed):
    """The peer agent aborted; ``token`` is its MH's abort token (target), maybe empty."""

    def __init__(self, reason: str, token: bytes) -> None:
        super().__init__(reason)
        self.token = token


def abort_mh(client: MailboxClient, token: bytes = b"") -> str | None:
    """ABORT the MH; returns why it refused, or None if it dropped its session."""
    try:
        client.ask(Command.ABORT, token)
    except (MhRefused, MigrationFailed) as err:
        return str(err)
    return None


def _source_handshake(client: MailboxClient, channel: Channel, hello: HelloReply
                      ) -> dict[str, Any]:
    """The source's half of the nonce exchange; the target's ``open`` message."""
    own = _open(client, Role.SOURCE).own_nonce
    channel.send_json(FrameKind.CONTROL, {
        "mh": "open", "nonce": own.hex(), "max-batch": hello.max_batch_pages,
        "ram-pages": hello.ram_pages})
    peer = _expect(channel, "open", "target")
    if _int(peer, "ram-pages") != hello.ram_pages:
        raise MigrationFailed(f"the target's guest has {peer['ram-pages']} pages, the "
                              f"source's {hello.ram_pages}")
    session = _open(client, Role.SOURCE, _hex(peer, "nonce")).session_id
    if session != _hex(peer, "session"):
        raise ProtocolError("the MHs derived different session ids")
    return peer


@attrs.define
class SourceSession:
    """The source agent's MH session: open before the rounds, commit after the stream.

    :ivar pages: the page path to hand the engine.
    :ivar sealed: the MH produced its manifest (it resumes only on the target's token).
    """

    client: MailboxClient
    channel: Channel
    pages: MhSourcePages
    sealed: bool = False
    committed: bool = False

    @classmethod
    def open(cls, client: MailboxClient, channel: Channel, vcpus: int = 0) -> SourceSession:
        """HELLO and the nonce exchange with the target (module doc).

        :param vcpus: the guest's vCPUs, whose state an MH with the CPU_STATE
            capability (SEV-ES) seals after the last pages.
        :raises MigrationFailed: the target refused; the MH is aborted.
        """
        hello = _hello(client)
        try:
            peer = _source_handshake(client, channel, hello)
        except BaseException:
            abort_mh(client)
            raise
        pages = MhSourcePages(client, batch_pages=min(hello.max_batch_pages,
                                                      _int(peer, "max-batch")),
                              ram_pages=hello.ram_pages,
                              vcpus=vcpus if hello.capabilities & Capability.CPU_STATE else 0)
        return cls(client, channel, pages)

    def commit(self, emit: Emit) -> None:
        """After the target acknowledged the stream: manifest out, receipt in, retire.

        :raises MigrationFailed: the target refused (the source MH is aborted
            with its token) or the exchange broke (the MH may stay sealed).
        """
        manifest = self.client.ask(Command.MANIFEST)
        self.sealed = True
        emit("manifest")
        # A target that failed after the stream has already sent its ABORT (with the
        # token) and may be gone: a broken send still leaves that to read.
        with contextlib.suppress(ChannelClosed):
            self.channel.send_json(FrameKind.CONTROL, {"mh": "manifest",
                                                       "record": manifest.hex()})
        receipt = _hex(_expect(self.channel, "receipt", "target"), "record")
        self.client.ask(Command.COMMIT, receipt)
        self.committed = True
        emit("committed")

    def abort(self, err: BaseException) -> str:
        """Drop the MH's session after ``err``; returns the error message to report.

        A sealed source aborts only on the target's abort token; without
        one it stays sealed (it must not resume: the target may run) and the
        message says so.
        """
        reason = str(err) or type(err).__name__
        if self.committed:
            return reason
        token = err.token if isinstance(err, _PeerAborted) else b""
        if self.sealed and not token:
            return (f"{reason}; the source's MH is sealed and got no abort token from the "
                    "target: the source must not resume")
        try:
            self.pages.drain()
        except VmmigError as stuck:
            return f"{reason}; the source's MH could not abort ({stuck})"
        refused = abort_mh(self.client, token)
        if refused is not None:
            return f"{reason}; the source's MH could not abort ({refused})"
        return reason


def receive_guest(monitor: MachineMonitor, client: MailboxClient, channel: Channel,
                  emit: Emit, await_commit: Callable[[], None]) -> None:
    """The target's whole MH migration: handshake, records in (``received``), verify, commit.

    :param await_commit: returns when the MH may commit; raises to abort instead.

    :raises VmmigError: anything failed before the commit (the MH's refusal
        is :class:`~vmmig.agents.mh_mailbox.MhRefused`); the MH was aborted
        and the source told why, with the MH's abort token.
    """
    committed = False
    pages = MhTargetPages(client)
    try:
        hello = _hello(client)
        pages.sealed_cpu_state = bool(hello.capabilities & Capability.CPU_STATE)
        peer = _expect(channel, "open", "source")
        reply = _open(client, Role.TARGET, _hex(peer, "nonce"))
        channel.send_json(FrameKind.CONTROL, {
            "mh": "open", "nonce": reply.own_nonce.hex(), "session": reply.session_id.hex(),
            "max-batch": hello.max_batch_pages, "ram-pages": hello.ram_pages})
        written = run_target(monitor, channel, pages)
        emit("received", pages=written + pages.flush())
        manifest = _hex(_expect(channel, "manifest", "source"), "record")
        client.ask(Command.MANIFEST, manifest)
        emit("verified")
        await_commit()
        receipt = client.ask(Command.COMMIT)
        committed = True
        emit("committed")
        channel.send_json(FrameKind.CONTROL, {"mh": "receipt", "record": receipt.hex()})
    except BaseException as err:
        if not committed:
            pages.drain()
            _abort_target(client, channel, err)
        raise


def _abort_target(client: MailboxClient, channel: Channel, err: BaseException) -> None:
    """Abort the target's MH and tell the source why, with the MH's abort token."""
    token = b""
    with contextlib.suppress(MhRefused, MigrationFailed):
        token = client.ask(Command.ABORT)
    if isinstance(err, _PeerAborted):
        return  # the source gave up first: it does not wait for us
    with contextlib.suppress(VmmigError, OSError):
        channel.send_json(FrameKind.ABORT, {"reason": str(err) or type(err).__name__,
                                            "token": token.hex()})
