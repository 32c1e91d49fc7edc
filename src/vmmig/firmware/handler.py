"""The Migration Handler: mailbox requests in, responses out, for either role.

Sans-IO (after h11): no threads, no shared memory, no clock.  The code that
runs it on the helper vCPU copies a request out of its slot and calls
:meth:`MigrationHandler.handle_into` with the slot as the response buffer
(a sealed page record is written there directly: no copy of a batch); here
it is plain bytes, so the whole protocol is tested by function calls.

The handler trusts its constructor's arguments (guest RAM and the master
secret come from inside the guest) and nothing in a request.  Whatever a
request holds, the answer is a response: :class:`~vmmig.firmware.abi.Refusal`
becomes its status, and any other exception (a bug) becomes INTERNAL_ERROR.

A target whose stream fails an integrity check (AUTH_FAILED, REPLAY,
OUT_OF_ORDER, MISMATCH) goes to ``failed`` and can never commit that
session.  Malformed framing (BAD_REQUEST, TOO_LARGE) does not poison it: no
authenticated data was involved and nothing changed.

Which roles an MH may play is a launch-time fact (``roles``): the running
source guest must never accept the target role, or a host could import an
old stream of the same guest into it.

An SEV-ES guest's MH is given its vCPUs (``cpus``): it then moves their
states too (:mod:`vmmig.firmware.cpus`).  The source seals a manifest only
once every vCPU's state is in the stream; the target verifies a manifest
only if it counts every one of its vCPUs, and restores them at COMMIT.
Without ``cpus`` (SEV: the hypervisor moves the registers) the CPU-state
commands are UNSUPPORTED and the manifest's CPU fields stay zero.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable

import attrs
import numpy as np
import numpy.typing as npt

from vmmig.firmware import abi, manifest
from vmmig.firmware.abi import (
    ABI_VERSION,
    HEADER_SIZE,
    NONCE_SIZE,
    Capability,
    Command,
    Refusal,
    Role,
    Status,
)
from vmmig.firmware.cpus import CPU_BODY_SIZE, GuestCpus, pack_cpu_body, unpack_cpu_body
from vmmig.firmware.envelope import RecordKind
from vmmig.firmware.keys import SessionKeys, derive_session_keys
from vmmig.firmware.records import RecordOpener, RecordSealer, page_record_size
from vmmig.firmware.states import SESSION_STATES, MhEvent, MhState, next_state, role_of


__all__ = ["CAPABILITIES", "MigrationHandler"]

_log = logging.getLogger(__name__)

#: What every MH implements; one given the guest's vCPUs adds CPU_STATE.
CAPABILITIES = Capability.BATCH | Capability.ZERO_BITMAP | Capability.RECEIPTS
_CPU_COMMANDS = frozenset({Command.EXPORT_CPU_STATE, Command.IMPORT_CPU_STATE})
_IMPORT_REPLY = struct.Struct("<QI4x")
_POISON = frozenset(
    {Status.AUTH_FAILED, Status.REPLAY, Status.OUT_OF_ORDER, Status.MISMATCH, Status.INTERNAL_ERROR}
)
_ECHO = struct.Struct("<I4xQ")
_NEEDS_SESSION = _CPU_COMMANDS | {
    Command.EXPORT_PAGES,
    Command.IMPORT_PAGES,
    Command.MANIFEST,
    Command.COMMIT,
}


@attrs.frozen
class _Reply:
    """A command's outcome: its payload, or how many bytes it wrote in place (``written``)."""

    payload: bytes | bytearray = b""
    status: Status = Status.OK
    detail: int = 0
    written: int | None = None


@attrs.define
class MigrationHandler:
    """One guest's MH: owns the session state, keys and page streams.

    :param memory: guest RAM in plaintext, ``(pages, 4096)`` uint8 (writable
        on a target).
    :param master_secret: the migration secret injected at launch.
    :param max_batch_pages: most pages one EXPORT/IMPORT carries.
    :param roles: roles this MH may take (a launch-time, measured choice).
    :param random: source of nonces (``os.urandom``; tests pin it).
    :param cpus: the guest's vCPUs, for an SEV-ES guest (None: SEV, no CPU state).
    """

    memory: npt.NDArray[np.uint8]
    master_secret: bytes = attrs.field(repr=False)
    max_batch_pages: int = 512
    roles: frozenset[Role] = frozenset({Role.SOURCE, Role.TARGET})
    random: Callable[[int], bytes] = attrs.field(default=os.urandom, repr=False)
    cpus: GuestCpus | None = attrs.field(default=None, repr=False)
    state: MhState = attrs.field(init=False, default=MhState.IDLE)
    _role: Role = attrs.field(init=False, default=Role.NONE)
    _own_nonce: bytes | None = attrs.field(init=False, default=None, repr=False)
    _keys: SessionKeys | None = attrs.field(init=False, default=None, repr=False)
    _sealer: RecordSealer | None = attrs.field(init=False, default=None, repr=False)
    _opener: RecordOpener | None = attrs.field(init=False, default=None, repr=False)
    _manifest: manifest.Manifest | None = attrs.field(init=False, default=None, repr=False)
    #: vCPU index -> state: exported (source) or staged until COMMIT (target).
    _cpu_states: dict[int, bytes] = attrs.field(init=False, factory=dict, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.memory.ndim != 2 or self.memory.shape[1] != abi.PAGE_SIZE:
            raise ValueError("guest memory must be a (pages, 4096) array")

    @property
    def response_capacity(self) -> int:
        """Bytes the largest response takes (a full batch's sealed record)."""
        return HEADER_SIZE + page_record_size(self.max_batch_pages)

    def handle(self, request: bytes | bytearray | memoryview) -> bytearray:
        """:meth:`handle_into` a fresh buffer; the response."""
        out = bytearray(self.response_capacity)
        del out[self.handle_into(request, memoryview(out)):]
        return out

    def handle_into(self, request: bytes | bytearray | memoryview, out: memoryview) -> int:
        """Process one request (a private copy of a slot); write the response at the start
        of ``out``, which holds :attr:`response_capacity` bytes; its length."""
        command, seq = _echo(request)
        try:
            parsed = abi.unpack_request(request)
            reply = self._dispatch(parsed, out[HEADER_SIZE:])
        except Refusal as refusal:
            _log.info("MH refuses %#x: %s", command, refusal)
            self._fail_if_poisoned(refusal.status)
            reply = _Reply(status=refusal.status, detail=refusal.detail)
        except Exception:  # the MH must answer whatever happens; this is a bug
            _log.exception("MH internal error on %#x", command)
            self._fail_if_poisoned(Status.INTERNAL_ERROR)
            reply = _Reply(status=Status.INTERNAL_ERROR)
        length = reply.written
        if length is None:
            length = len(reply.payload)
            out[HEADER_SIZE:HEADER_SIZE + length] = reply.payload
        abi.pack_response_header(out, command=command, status=reply.status, seq=seq,
                                 length=length, detail=reply.detail)
        return HEADER_SIZE + length

    # -- dispatch ---------------------------------------------------------------

    def _dispatch(self, request: abi.Request, out: memoryview) -> _Reply:
        command = request.command
        if command in _CPU_COMMANDS and self.cpus is None:
            raise Refusal(Status.UNSUPPORTED, "CPU state transfer needs the vCPUs (SEV-ES)")
        if command in _NEEDS_SESSION and self.state not in SESSION_STATES:
            raise Refusal(Status.NO_SESSION, f"{command.name} needs an open session")
        methods: dict[Command, Callable[[bytes | memoryview], _Reply]] = {
            Command.HELLO: self._hello,
            Command.OPEN_SESSION: self._open_session,
            Command.ABORT: self._abort,
            Command.EXPORT_PAGES: lambda payload: self._export(payload, out),
            Command.IMPORT_PAGES: self._import,
            Command.EXPORT_CPU_STATE: lambda payload: self._export_cpu(payload, out),
            Command.IMPORT_CPU_STATE: self._import_cpu,
            Command.MANIFEST: self._manifest_command,
            Command.COMMIT: self._commit,
        }
        return methods[command](request.payload)

    def _advance(self, event: MhEvent, role: Role | None = None) -> MhState:
        """The state ``event`` leads to; Refusal(BAD_STATE) if it is illegal now."""
        state = next_state(self.state, event, role)
        if state is None:
            raise Refusal(Status.BAD_STATE, f"{event.value} in state {self.state.name}")
        return state

    def _fail_if_poisoned(self, status: Status) -> None:
        if status in _POISON:
            failed = next_state(self.state, MhEvent.INTEGRITY_FAILURE)
            if failed is not None:
                self.state = failed

    def _session(self) -> SessionKeys:
        assert self._keys is not None, "session states hold keys"
        return self._keys

    # -- commands ---------------------------------------------------------------

    def _hello(self, payload: bytes | memoryview) -> _Reply:
        hello = abi.HelloRequest.unpack(payload)
        capabilities = CAPABILITIES if self.cpus is None else CAPABILITIES | Capability.CPU_STATE
        reply = abi.HelloReply(
            ABI_VERSION,
            self.max_batch_pages,
            int(capabilities),
            int(self.state),
            role_of(self.state),
            len(self.memory),
        )
        status = Status.OK if hello.abi_version == ABI_VERSION else Status.UNSUPPORTED
        return _Reply(reply.pack(), status)

    def _open_session(self, payload: bytes | memoryview) -> _Reply:
        request = abi.OpenSessionRequest.unpack(payload)
        if request.role not in self.roles:
            raise Refusal(Status.UNSUPPORTED, f"this MH may not act as {request.role.name}")
        complete = request.peer_nonce != bytes(NONCE_SIZE)
        state = self._advance(MhEvent.OPEN if complete else MhEvent.ISSUE_NONCE, request.role)
        if self._own_nonce is None:
            self._own_nonce = self.random(NONCE_SIZE)
        own = self._own_nonce
        if not complete:
            self.state, self._role = state, request.role
            return _Reply(abi.OpenSessionReply(own).pack())
        if request.peer_nonce == own:
            raise Refusal(Status.BAD_REQUEST, "the peer nonce is this MH's own")
        if request.role is Role.SOURCE:
            keys = derive_session_keys(self.master_secret, own, request.peer_nonce)
            self._sealer = RecordSealer(
                self.memory, keys.data, keys.session_id, self.max_batch_pages
            )
        else:
            keys = derive_session_keys(self.master_secret, request.peer_nonce, own)
            self._opener = RecordOpener(
                self.memory, keys.data, keys.session_id, self.max_batch_pages
            )
        self._keys, self.state, self._role = keys, state, request.role
        return _Reply(abi.OpenSessionReply(own, keys.session_id).pack())

    def _export(self, payload: bytes | memoryview, out: memoryview) -> _Reply:
        """Seal the batch straight into ``out`` (the reply's payload)."""
        state = self._advance(MhEvent.EXPORT)
        assert self._sealer is not None
        gpas = abi.unpack_export_request(payload, self.max_batch_pages)
        written = self._sealer.seal_into(gpas, out)
        self.state = state
        return _Reply(written=written)

    def _import(self, payload: bytes | memoryview) -> _Reply:
        state = self._advance(MhEvent.IMPORT)
        assert self._opener is not None
        seq, count = self._opener.open(payload)
        self.state = state
        return _Reply(_IMPORT_REPLY.pack(seq, count))

    def _export_cpu(self, payload: bytes | memoryview, out: memoryview) -> _Reply:
        """Seal one vCPU's state into ``out``, once per session."""
        state = self._advance(MhEvent.EXPORT)
        assert self._sealer is not None
        assert self.cpus is not None, "dispatch refuses CPU state without cpus"
        index = abi.VcpuIndex.unpack(payload).vcpu_index
        if index >= self.cpus.count:
            raise Refusal(Status.BAD_REQUEST, f"no vCPU {index} (of {self.cpus.count})")
        if index in self._cpu_states:
            raise Refusal(Status.BAD_REQUEST, f"vCPU {index}'s state is already in the stream")
        cpu_state = self.cpus.save(index)
        body = pack_cpu_body(index, cpu_state)
        written = self._sealer.seal_body_into(RecordKind.CPU_STATE, body, out)
        self._cpu_states[index], self.state = cpu_state, state
        return _Reply(written=written)

    def _import_cpu(self, payload: bytes | memoryview) -> _Reply:
        """Authenticate one vCPU's state and stage it: it reaches the vCPU only at COMMIT."""
        state = self._advance(MhEvent.IMPORT)
        assert self._opener is not None
        assert self.cpus is not None, "dispatch refuses CPU state without cpus"
        body = self._opener.open_body(payload, RecordKind.CPU_STATE, CPU_BODY_SIZE)
        index, cpu_state = unpack_cpu_body(body, self.cpus.count)
        if index in self._cpu_states:
            # Only a forked source seals a vCPU twice: which state is the real one is unknowable.
            raise Refusal(Status.REPLAY, f"a second state for vCPU {index}")
        self._cpu_states[index], self.state = cpu_state, state
        return _Reply(abi.VcpuIndex(index).pack())

    def _manifest_command(self, payload: bytes | memoryview) -> _Reply:
        keys = self._session()
        if self._sealer is not None:
            state = self._advance(MhEvent.SEAL_MANIFEST)
            if payload:
                raise Refusal(Status.BAD_REQUEST, "the source's MANIFEST takes no payload")
            self._check_every_cpu_exported()
            sealer = self._sealer
            made = manifest.Manifest.of(keys, self.memory, sealer.versions, sealer.next_seq,
                                        self._cpu_states)
            sealed = manifest.seal_manifest(keys, made)
            self._manifest, self.state = made, state
            return _Reply(sealed)
        state = self._advance(MhEvent.VERIFY_MANIFEST)
        assert self._opener is not None
        claimed = manifest.open_manifest(keys, payload)
        opener = self._opener
        held = manifest.Manifest.of(keys, self.memory, opener.versions, opener.next_seq,
                                    self._cpu_states)
        mismatch = claimed.compare(held)
        if self.cpus is not None and claimed.vcpu_states != self.cpus.count:
            # The staged states may match the manifest's and still miss a vCPU of ours
            # (a source with fewer): that vCPU could not resume.
            mismatch |= manifest.MismatchBits.CPU_STATE
        if mismatch:
            raise Refusal(Status.MISMATCH, f"manifest differs: {mismatch!r}", int(mismatch))
        self._manifest, self.state = claimed, state
        return _Reply()

    def _commit(self, payload: bytes | memoryview) -> _Reply:
        state = self._advance(MhEvent.COMMIT)
        keys, made = self._session(), self._manifest
        assert made is not None, "commit is legal only after a manifest"
        if self._role is Role.SOURCE:
            manifest.open_commit_receipt(keys, made, payload)
            self.state = state
            return _Reply()
        if payload:
            raise Refusal(Status.BAD_REQUEST, "the target's COMMIT takes no payload")
        if self.cpus is not None:
            self.cpus.restore(dict(sorted(self._cpu_states.items())))
        receipt = manifest.seal_commit_receipt(keys, made)
        self.state = state
        return _Reply(receipt)

    def _abort(self, payload: bytes | memoryview) -> _Reply:
        state = self._advance(MhEvent.ABORT)
        token = b""
        if self.state is MhState.SOURCE_SEALED:
            manifest.open_abort_token(self._session(), payload)
        elif payload:
            raise Refusal(Status.BAD_REQUEST, "ABORT takes a payload only on a sealed source")
        elif self._role is Role.TARGET and self._keys is not None:
            token = manifest.seal_abort_token(self._keys)
        self._drop_session()
        self.state = state
        return _Reply(token)

    def _drop_session(self) -> None:
        """Forget keys, nonce and streams: a new session needs new nonces."""
        self._role, self._own_nonce, self._keys = Role.NONE, None, None
        self._sealer = self._opener = None
        self._manifest = None
        self._cpu_states = {}

    def _check_every_cpu_exported(self) -> None:
        """Refusal(BAD_STATE) unless every vCPU's state is in the stream: a manifest
        without one would let the target commit a guest that cannot resume."""
        if self.cpus is None:
            return
        missing = sorted(set(range(self.cpus.count)) - self._cpu_states.keys())
        if missing:
            raise Refusal(Status.BAD_STATE, f"vCPU states not exported: {missing}")


def _echo(request: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Command and mailbox sequence to echo, even from a request too broken to parse."""
    view = memoryview(request).cast("B")
    if len(view) < _ECHO.size:
        return 0, 0
    command, seq = _ECHO.unpack_from(view)
    return int(command), int(seq)
