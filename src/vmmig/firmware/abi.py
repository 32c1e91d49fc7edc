"""The Migration Handler's mailbox ABI, version 1: layouts, codes, pack/unpack.

``docs/mh-mailbox-abi.md`` is the byte-by-byte reference; this module is its
executable twin, so a C/OVMF implementation and this one can be checked
against the same tables.  Everything is little-endian.

Why the parsing is so defensive: every request comes from the hypervisor,
which is untrusted (DESIGN.md, "Trust model").  A request that is short,
long, has a reserved field set or an unknown code is refused with
:attr:`Status.BAD_REQUEST`; nothing here may raise anything but
:class:`Refusal`, which the handler turns into a response.  Callers must hand
these functions a private copy of the slot: shared memory read twice can
change in between (a double fetch).
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt


__all__ = [
    "ABI_VERSION",
    "HEADER_SIZE",
    "NONCE_SIZE",
    "PAGE_SIZE",
    "QUEUE_DESC_SIZE",
    "REGION_HEADER_SIZE",
    "REGION_MAGIC",
    "Capability",
    "Command",
    "HelloReply",
    "HelloRequest",
    "MailboxLayout",
    "OpenSessionReply",
    "OpenSessionRequest",
    "Refusal",
    "Request",
    "Response",
    "Role",
    "Status",
    "VcpuIndex",
    "pack_export_request",
    "pack_request",
    "unpack_export_request",
    "unpack_request",
    "unpack_response",
]

#: ABI version spoken by this module (HELLO refuses any other).
ABI_VERSION: Final = 1
#: Bytes of a guest page.
PAGE_SIZE: Final = 4096
#: Bytes of an MH nonce (OPEN_SESSION).
NONCE_SIZE: Final = 32
#: ``"VMMB"``: first four bytes of the shared region.
REGION_MAGIC: Final = int.from_bytes(b"VMMB", "little")

_REQUEST = struct.Struct("<IIQ16x")  # command, payload_length, mailbox_seq, reserved
_RESPONSE = struct.Struct("<IIQII8x")  # command, status, mailbox_seq, payload_length, detail
#: Bytes of a request or response header (both are 32).
HEADER_SIZE: Final = _REQUEST.size
assert _RESPONSE.size == HEADER_SIZE

_REGION = struct.Struct("<IIQIIIII4xQ16x")
_QUEUE = struct.Struct("<QQQQII24x")
#: Bytes of the region header (offset 0 of the shared region).
REGION_HEADER_SIZE: Final = _REGION.size
#: Bytes of one queue descriptor (the table starts right after the region header).
QUEUE_DESC_SIZE: Final = _QUEUE.size
assert (REGION_HEADER_SIZE, QUEUE_DESC_SIZE) == (64, 64)
_HELLO_REQ = struct.Struct("<IIQ")  # host abi version, reserved, host capabilities
_HELLO_REP = struct.Struct("<IIQIIQ")  # abi, max batch, caps, state, role, ram pages
_OPEN_REQ = struct.Struct(f"<II{NONCE_SIZE}s")  # role, reserved, peer nonce
_OPEN_REP = struct.Struct(f"<{NONCE_SIZE}s32s")  # own nonce, session id
_EXPORT_REQ = struct.Struct("<II")  # count, reserved; then count x u64 GPA
_VCPU = struct.Struct("<II")  # vCPU index, reserved


class Command(enum.IntEnum):
    """Request codes (u32)."""

    #: Version and capabilities; legal in every state.
    HELLO = 0x01
    #: Nonce exchange and key derivation.
    OPEN_SESSION = 0x02
    #: Source: a list of GPAs in, one sealed page record out.
    EXPORT_PAGES = 0x10
    #: Target: one sealed page record in.
    IMPORT_PAGES = 0x11
    #: Source, SEV-ES: a vCPU index in, that vCPU's sealed state (VMSA) out.
    EXPORT_CPU_STATE = 0x20
    #: Target, SEV-ES: one sealed vCPU state in, staged until COMMIT.
    IMPORT_CPU_STATE = 0x21
    #: Source: produce the sealed manifest; target: verify it.
    MANIFEST = 0x30
    #: Target: run after verification (receipt out); source: retire (receipt in).
    COMMIT = 0x31
    #: Drop the session (target: abort token out; source after MANIFEST: token in).
    ABORT = 0x32


class Status(enum.IntEnum):
    """Response status codes (u32)."""

    OK = 0
    #: Malformed request: sizes, reserved fields, codes, GPAs.
    BAD_REQUEST = 1
    #: AEAD tag or session id wrong: tampered, forged or spliced.
    AUTH_FAILED = 2
    #: Sequence number already consumed.
    REPLAY = 3
    #: Sequence number skips ahead (a record dropped or reordered) or a page
    #: version does not follow the one held.
    OUT_OF_ORDER = 4
    #: Command not legal in the MH's current state.
    BAD_STATE = 5
    #: More pages than max batch, or the reply would not fit a slot.
    TOO_LARGE = 6
    #: The command needs an open session and there is none.
    NO_SESSION = 7
    #: Command, role or ABI version this MH does not implement (CPU state without vCPUs).
    UNSUPPORTED = 8
    #: Manifest or CPU state disagrees with what the target holds (``detail`` says what).
    MISMATCH = 9
    #: A bug in the MH; the session is failed.
    INTERNAL_ERROR = 10


class Role(enum.IntEnum):
    """Which end of a migration an MH plays (u32)."""

    NONE = 0
    SOURCE = 1
    TARGET = 2


class Capability(enum.IntFlag):
    """Capability bits (u64) in the region header and in HELLO."""

    #: EXPORT/IMPORT_PAGES take batches of up to max batch pages.
    BATCH = 1 << 0
    #: Page records carry the encrypted zero-page bitmap.
    ZERO_BITMAP = 1 << 1
    #: EXPORT/IMPORT_CPU_STATE are implemented: the MH holds the guest's vCPUs (SEV-ES).
    CPU_STATE = 1 << 2
    #: COMMIT exchanges a sealed receipt; ABORT after MANIFEST needs a token.
    RECEIPTS = 1 << 3


class Refusal(Exception):
    """Raised inside the MH to answer a request with a non-OK status.

    :param status: the status to report.
    :param reason: for logs and tests; never sent (the ABI has no strings).
    :param detail: the response header's ``detail`` word.
    """

    def __init__(self, status: Status, reason: str, detail: int = 0) -> None:
        super().__init__(f"{status.name}: {reason}")
        self.status = status
        self.reason = reason
        self.detail = detail


@attrs.frozen
class Request:
    """A request as read from a slot: header fields and the payload bytes (a view of
    the private copy the MH parses, when it comes from :func:`unpack_request`)."""

    command: Command
    mailbox_seq: int
    payload: bytes | memoryview = b""


@attrs.frozen
class Response:
    """A response header's fields and its payload."""

    command: int
    status: Status
    mailbox_seq: int
    payload: bytes = b""
    detail: int = 0


def pack_request(request: Request) -> bytes:
    """The bytes a host writes into a slot for ``request``."""
    header = _REQUEST.pack(request.command, len(request.payload), request.mailbox_seq)
    return header + request.payload


def unpack_request(data: bytes | bytearray | memoryview) -> Request:
    """Parse a slot's request; :class:`Refusal` (BAD_REQUEST) if malformed."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        raise Refusal(Status.BAD_REQUEST, "shorter than a request header")
    command, length, seq = _REQUEST.unpack_from(view)
    if any(view[16:HEADER_SIZE]):
        raise Refusal(Status.BAD_REQUEST, "reserved header bytes set")
    if length != len(view) - HEADER_SIZE:
        raise Refusal(Status.BAD_REQUEST, "payload length disagrees with the request size")
    try:
        code = Command(command)
    except ValueError:
        raise Refusal(Status.UNSUPPORTED, f"unknown command {command:#x}") from None
    return Request(code, seq, view[HEADER_SIZE:])


def pack_response_header(
    out: bytearray | memoryview, *, command: int, status: Status, seq: int, length: int, detail: int
) -> None:
    """Write a response header at the start of ``out`` (the payload follows it)."""
    _RESPONSE.pack_into(out, 0, command, status, seq, length, detail)


def unpack_response(data: bytes | bytearray | memoryview) -> Response:
    """Parse a response (the host's side); ValueError if malformed."""
    view = memoryview(data).cast("B")
    if len(view) < HEADER_SIZE:
        raise ValueError("shorter than a response header")
    command, status, seq, length, detail = _RESPONSE.unpack_from(view)
    if length != len(view) - HEADER_SIZE:
        raise ValueError("payload length disagrees with the response size")
    return Response(command, Status(status), seq, bytes(view[HEADER_SIZE:]), detail)


def _exact(payload: bytes | memoryview, layout: struct.Struct, what: str) -> tuple[Any, ...]:
    """Fields of a fixed-size payload whose second field is a reserved zero word."""
    if len(payload) != layout.size:
        raise Refusal(Status.BAD_REQUEST, f"{what} payload must be {layout.size} bytes")
    fields = layout.unpack(payload)
    if fields[1]:
        raise Refusal(Status.BAD_REQUEST, f"{what} reserved word set")
    return fields


@attrs.frozen
class HelloRequest:
    """HELLO: the host's ABI version and capabilities."""

    abi_version: int
    capabilities: int = 0

    def pack(self) -> bytes:
        """Payload bytes."""
        return _HELLO_REQ.pack(self.abi_version, 0, self.capabilities)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> HelloRequest:
        """Parse a payload; Refusal if malformed."""
        version, _, caps = _exact(payload, _HELLO_REQ, "HELLO")
        return cls(int(version), int(caps))


@attrs.frozen
class HelloReply:
    """HELLO's reply: what this MH speaks and where it stands."""

    abi_version: int
    max_batch_pages: int
    capabilities: int
    state: int
    role: Role
    ram_pages: int

    def pack(self) -> bytes:
        """Payload bytes."""
        return _HELLO_REP.pack(
            self.abi_version,
            self.max_batch_pages,
            self.capabilities,
            self.state,
            self.role,
            self.ram_pages,
        )

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> HelloReply:
        """Parse a reply payload."""
        abi, batch, caps, state, role, pages = _HELLO_REP.unpack(payload)
        return cls(abi, batch, caps, state, Role(role), pages)


@attrs.frozen
class OpenSessionRequest:
    """OPEN_SESSION: the role to play and the peer's nonce (all zero: not yet known)."""

    role: Role
    peer_nonce: bytes = bytes(NONCE_SIZE)

    def pack(self) -> bytes:
        """Payload bytes."""
        return _OPEN_REQ.pack(self.role, 0, self.peer_nonce)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> OpenSessionRequest:
        """Parse a payload; Refusal if malformed."""
        role, _, nonce = _exact(payload, _OPEN_REQ, "OPEN_SESSION")
        if role not in (Role.SOURCE, Role.TARGET):
            raise Refusal(Status.BAD_REQUEST, f"role {role} is neither source nor target")
        return cls(Role(role), bytes(nonce))


@attrs.frozen
class OpenSessionReply:
    """OPEN_SESSION's reply: this MH's nonce and, once open, the session id."""

    own_nonce: bytes
    session_id: bytes = bytes(32)

    def pack(self) -> bytes:
        """Payload bytes."""
        return _OPEN_REP.pack(self.own_nonce, self.session_id)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> OpenSessionReply:
        """Parse a reply payload."""
        nonce, session = _OPEN_REP.unpack(payload)
        return cls(nonce, session)


@attrs.frozen
class VcpuIndex:
    """EXPORT_CPU_STATE's request and IMPORT_CPU_STATE's reply: which vCPU."""

    vcpu_index: int

    def pack(self) -> bytes:
        """Payload bytes."""
        return _VCPU.pack(self.vcpu_index, 0)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> VcpuIndex:
        """Parse a payload; Refusal if malformed (the range is the handler's to check)."""
        index, _ = _exact(payload, _VCPU, "CPU state")
        return cls(int(index))


def pack_export_request(gpas: npt.ArrayLike) -> bytes:
    """EXPORT_PAGES payload for a list of page-aligned GPAs."""
    array = np.asarray(gpas, dtype="<u8")
    return _EXPORT_REQ.pack(len(array), 0) + array.tobytes()


def unpack_export_request(payload: bytes | memoryview, max_batch: int) -> npt.NDArray[np.uint64]:
    """EXPORT_PAGES payload -> GPAs (unchecked against RAM: the handler does that)."""
    if len(payload) < _EXPORT_REQ.size:
        raise Refusal(Status.BAD_REQUEST, "EXPORT_PAGES payload shorter than its header")
    count, reserved = _EXPORT_REQ.unpack_from(payload)
    if reserved:
        raise Refusal(Status.BAD_REQUEST, "EXPORT_PAGES reserved word set")
    if count > max_batch:
        raise Refusal(Status.TOO_LARGE, f"{count} pages > max batch {max_batch}")
    if count == 0 or len(payload) != _EXPORT_REQ.size + 8 * count:
        raise Refusal(Status.BAD_REQUEST, "EXPORT_PAGES count disagrees with its size")
    return np.frombuffer(payload, dtype="<u8", count=count, offset=_EXPORT_REQ.size)


@attrs.frozen
class MailboxLayout:
    """Where the region header, queue descriptors and slots sit.

    Two slots per queue (request ``seq`` uses slot ``seq % 2``): the host
    fills one while the MH works on the other.  A slot holds a request, and
    the MH overwrites it with the response, so one slot is sized for the
    larger of the two: a full EXPORT reply.
    """

    queue_count: int = attrs.field(default=1, validator=attrs.validators.in_(range(1, 65)))
    max_batch_pages: int = attrs.field(default=512, validator=attrs.validators.in_(range(1, 4097)))
    capabilities: int = int(Capability.BATCH | Capability.ZERO_BITMAP | Capability.RECEIPTS)

    @property
    def slot_capacity(self) -> int:
        """Bytes of one slot: response header, record header, entries, body, tag, rounded."""
        pages = self.max_batch_pages
        need = HEADER_SIZE + 64 + 16 * pages + 8 * ((pages + 63) // 64) + PAGE_SIZE * pages + 16
        return -(-need // PAGE_SIZE) * PAGE_SIZE

    @property
    def slots_offset(self) -> int:
        """Offset of the first slot: page-aligned after header and descriptors."""
        end = REGION_HEADER_SIZE + QUEUE_DESC_SIZE * self.queue_count
        return -(-end // PAGE_SIZE) * PAGE_SIZE

    @property
    def region_size(self) -> int:
        """Bytes of the whole shared region."""
        return self.slots_offset + 2 * self.queue_count * self.slot_capacity

    def slot_offset(self, queue: int, slot: int) -> int:
        """Offset of ``slot`` (0 or 1) of ``queue``."""
        return self.slots_offset + (2 * queue + slot) * self.slot_capacity

    def pack_header(self) -> bytes:
        """The region header the MH writes at offset 0."""
        return _REGION.pack(
            REGION_MAGIC,
            ABI_VERSION,
            self.capabilities,
            self.max_batch_pages,
            self.queue_count,
            REGION_HEADER_SIZE,
            QUEUE_DESC_SIZE,
            self.slot_capacity,
            self.region_size,
        )

    def pack_queue(self, queue: int, doorbell: int = 0, completion: int = 0) -> bytes:
        """Queue descriptor ``queue`` with its doorbell and completion words."""
        cap = self.slot_capacity
        return _QUEUE.pack(
            doorbell, completion, self.slot_offset(queue, 0), self.slot_offset(queue, 1), cap, cap
        )

    @classmethod
    def unpack_header(cls, data: bytes | bytearray | memoryview) -> MailboxLayout:
        """Read a region header back (a host discovering the mailbox); ValueError if bad."""
        fields = _REGION.unpack_from(data)
        magic, version, caps, batch, queues, queue_table, queue_bytes, slot, size = fields
        if magic != REGION_MAGIC or version != ABI_VERSION:
            raise ValueError("not a version-1 MH mailbox")
        layout = cls(queues, batch, caps)
        expected = (REGION_HEADER_SIZE, QUEUE_DESC_SIZE, layout.slot_capacity, layout.region_size)
        if (queue_table, queue_bytes, slot, size) != expected:
            raise ValueError("mailbox header disagrees with the version-1 layout")
        return layout

    @staticmethod
    def unpack_queue(data: bytes | bytearray | memoryview, offset: int) -> tuple[int, ...]:
        """``(doorbell, completion, slot0, slot1, cap0, cap1)`` of a descriptor."""
        return _QUEUE.unpack_from(data, offset)
