"""The sealed record every MH message travels in: header, entries, AES-256-GCM.

::

    offset  size  field
    0       4     magic "MHR1"
    4       2     kind (RecordKind)
    6       2     direction (1 source->target, 2 target->source)
    8       32    session id
    40      8     sequence number of the record in its (key, kind) stream
    48      4     entry count n
    52      4     body length b (plaintext bytes)
    56      8     reserved, zero
    64      16n   entries: n x {u64 GPA, u64 version}
    64+16n  b     ciphertext of the body
    ...     16    GCM tag

The associated data is bytes ``[0, 64 + 16n)``: everything in the clear is
authenticated, so the session, direction, GPAs, versions and sequence number
cannot be changed without the tag failing.

The GCM nonce is never sent: it is ``kind (u16) || direction (u16) || seq
(u64)``, little-endian.  Each key serves one direction (see
:mod:`vmmig.firmware.keys`) and each (kind, direction) stream numbers its
records 0, 1, 2... without reuse, so no (key, nonce) pair repeats; and a
receiver that rebuilds the nonce from the claimed sequence number makes a
forged number fail the tag.  ONE AEAD call seals a record, however many
pages it carries.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmmig.firmware.abi import Refusal, Status


__all__ = [
    "ENTRY",
    "RECORD_HEADER_SIZE",
    "TAG_SIZE",
    "Direction",
    "Envelope",
    "RecordKind",
    "nonce",
    "open_into",
    "open_message",
    "parse",
    "record_size",
    "seal_into",
    "seal_message",
]

_HEADER = struct.Struct("<IHH32sQII8x")
_NONCE = struct.Struct("<HHQ")
#: ``"MHR1"``.
RECORD_MAGIC: Final = int.from_bytes(b"MHR1", "little")
#: Bytes of the fixed record header.
RECORD_HEADER_SIZE: Final = _HEADER.size
#: Bytes of the GCM tag.
TAG_SIZE: Final = 16
#: One entry: the page's GPA and its version (numpy structured dtype).
ENTRY: Final = np.dtype([("gpa", "<u8"), ("version", "<u8")])


class RecordKind(enum.IntEnum):
    """What a record carries (u16)."""

    PAGES = 1
    CPU_STATE = 2
    MANIFEST = 3
    COMMIT_RECEIPT = 4
    ABORT_TOKEN = 5


class Direction(enum.IntEnum):
    """Who sealed a record (u16)."""

    SOURCE_TO_TARGET = 1
    TARGET_TO_SOURCE = 2


def nonce(kind: RecordKind, direction: Direction, seq: int) -> bytes:
    """The 12-byte GCM nonce of record ``seq`` of a (kind, direction) stream."""
    return _NONCE.pack(kind, direction, seq)


def record_size(count: int, body_length: int) -> int:
    """Bytes of a record with ``count`` entries and a ``body_length`` body."""
    return RECORD_HEADER_SIZE + ENTRY.itemsize * count + body_length + TAG_SIZE


def _frame_into(out: memoryview, *, kind: RecordKind, direction: Direction,
                session_id: bytes, seq: int, entries: npt.NDArray[np.void] | None,
                body: int) -> int:
    """Write the header and entries (the AD) at the start of ``out``; the AD's length."""
    count = 0 if entries is None else len(entries)
    _HEADER.pack_into(out, 0, RECORD_MAGIC, kind, direction, session_id, seq, count, body)
    if entries is not None:
        np.frombuffer(out, dtype=ENTRY, count=count, offset=RECORD_HEADER_SIZE)[...] = entries
    return RECORD_HEADER_SIZE + ENTRY.itemsize * count


def seal_into(
    aead: AESGCM,
    out: memoryview,
    *,
    kind: RecordKind,
    direction: Direction,
    session_id: bytes,
    seq: int,
    entries: npt.NDArray[np.void] | None,
    plaintext: bytes | bytearray | memoryview,
) -> int:
    """Seal a record into the start of ``out``; return its length.

    ``plaintext`` is encrypted straight into ``out`` (no intermediate copy).
    """
    body = memoryview(plaintext).nbytes
    ad_end = _frame_into(out, kind=kind, direction=direction, session_id=session_id, seq=seq,
                         entries=entries, body=body)
    end = ad_end + body + TAG_SIZE
    aead.encrypt_into(nonce(kind, direction, seq), plaintext, out[:ad_end], out[ad_end:end])
    return end


def seal_parts_into(
    key: bytes,
    out: memoryview,
    *,
    kind: RecordKind,
    direction: Direction,
    session_id: bytes,
    seq: int,
    entries: npt.NDArray[np.void] | None,
    parts: Sequence[bytes | memoryview],
) -> int:
    """:func:`seal_into` a body given in pieces (e.g. straight from guest RAM): the
    same record, without gathering the body into one buffer first."""
    body = sum(memoryview(part).nbytes for part in parts)
    ad_end = _frame_into(out, kind=kind, direction=direction, session_id=session_id, seq=seq,
                         entries=entries, body=body)
    encryptor = Cipher(algorithms.AES(key), modes.GCM(nonce(kind, direction, seq))).encryptor()
    encryptor.authenticate_additional_data(out[:ad_end])
    at = ad_end
    for part in parts:
        # update_into may need block-size slack past the part: the tag's room holds it.
        at += encryptor.update_into(part, out[at:])
    encryptor.finalize()
    out[at:at + TAG_SIZE] = encryptor.tag
    return at + TAG_SIZE


def seal_message(
    aead: AESGCM, *, kind: RecordKind, direction: Direction, session_id: bytes, body: bytes
) -> bytes:
    """A record without entries (manifest, receipt, token): the only one, sequence 0."""
    out = bytearray(record_size(0, len(body)))
    seal_into(
        aead,
        memoryview(out),
        kind=kind,
        direction=direction,
        session_id=session_id,
        seq=0,
        entries=None,
        plaintext=body,
    )
    return bytes(out)


@attrs.frozen
class Envelope:
    """A parsed, not yet authenticated record: nothing in it is trustworthy yet."""

    kind: RecordKind
    direction: Direction
    seq: int
    entries: npt.NDArray[np.void]
    body_length: int
    associated_data: memoryview
    sealed: memoryview


def parse(
    data: bytes | bytearray | memoryview,
    *,
    session_id: bytes,
    kind: RecordKind,
    direction: Direction,
    max_count: int,
) -> Envelope:
    """Check a record's framing; Refusal on anything but a well-formed record of ours.

    A record of another session is AUTH_FAILED (a splice); a record of the
    wrong kind or direction, or of a size its counts do not explain, is
    BAD_REQUEST; too many entries is TOO_LARGE.
    """
    view = memoryview(data).cast("B")
    if len(view) < RECORD_HEADER_SIZE + TAG_SIZE:
        raise Refusal(Status.BAD_REQUEST, "shorter than a record")
    magic, got_kind, got_dir, sid, seq, count, body = _HEADER.unpack_from(view)
    if magic != RECORD_MAGIC or any(view[56:RECORD_HEADER_SIZE]):
        raise Refusal(Status.BAD_REQUEST, "bad record magic or reserved bytes")
    if got_kind != kind or got_dir != direction:
        raise Refusal(Status.BAD_REQUEST, f"record kind/direction {got_kind}/{got_dir}")
    if sid != session_id:
        raise Refusal(Status.AUTH_FAILED, "record of another session")
    if count > max_count:
        raise Refusal(Status.TOO_LARGE, f"{count} entries > {max_count}")
    if len(view) != record_size(count, body):
        raise Refusal(Status.BAD_REQUEST, "record size disagrees with its counts")
    ad_end = RECORD_HEADER_SIZE + ENTRY.itemsize * count
    entries = np.frombuffer(view, dtype=ENTRY, count=count, offset=RECORD_HEADER_SIZE)
    return Envelope(kind, direction, seq, entries, body, view[:ad_end], view[ad_end:])


def open_into(aead: AESGCM, envelope: Envelope, out: memoryview) -> None:
    """Authenticate and decrypt ``envelope`` into ``out`` (exactly body-length bytes).

    Refusal(AUTH_FAILED) if the tag fails; ``out`` may then hold garbage and
    must not be used.
    """
    try:
        aead.decrypt_into(
            nonce(envelope.kind, envelope.direction, envelope.seq),
            envelope.sealed,
            envelope.associated_data,
            out,
        )
    except InvalidTag:
        raise Refusal(Status.AUTH_FAILED, "record tag does not verify") from None


def stream_into(context: AEADEncryptionContext | AEADDecryptionContext,
                data: memoryview, out: memoryview) -> None:
    """Run ``data`` through a GCM context into ``out`` (exactly as long): ``update_into``
    wants a block's slack past the output, which a page of guest RAM has not."""
    if len(data) < TAG_SIZE:
        tail = bytearray(2 * TAG_SIZE)
        context.update_into(data, tail)
        out[:] = tail[:len(data)]
        return
    head = len(data) - TAG_SIZE
    context.update_into(data[:head], out)  # out[head:] is the slack
    tail = bytearray(2 * TAG_SIZE)
    context.update_into(data[head:], tail)
    out[head:] = tail[:TAG_SIZE]


def decryptor(key: bytes, envelope: Envelope) -> AEADDecryptionContext:
    """A streaming decryption of ``envelope``'s body, its AD already fed; ``finalize()``
    raises :class:`~cryptography.exceptions.InvalidTag` unless the record is genuine."""
    tag = bytes(envelope.sealed[envelope.body_length:])
    context = Cipher(algorithms.AES(key), modes.GCM(
        nonce(envelope.kind, envelope.direction, envelope.seq), tag)).decryptor()
    context.authenticate_additional_data(envelope.associated_data)
    return context


def open_message(
    aead: AESGCM,
    data: bytes | bytearray | memoryview,
    *,
    session_id: bytes,
    kind: RecordKind,
    direction: Direction,
    body_length: int,
) -> bytes:
    """Authenticate an entry-less record (sequence 0, see :func:`seal_message`); its body."""
    envelope = parse(data, session_id=session_id, kind=kind, direction=direction, max_count=0)
    if envelope.body_length != body_length:
        raise Refusal(Status.BAD_REQUEST, f"{kind.name} body must be {body_length} bytes")
    out = bytearray(body_length)
    open_into(aead, envelope, memoryview(out))
    if envelope.seq != 0:
        raise Refusal(Status.OUT_OF_ORDER, f"{kind.name} with sequence {envelope.seq}")
    return bytes(out)
