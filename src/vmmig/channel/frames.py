"""The channel's wire format (sans-IO).

Every frame is a 16-byte header followed by ``length`` payload bytes::

    offset  size  field
    0       2     magic, b"VM"
    2       1     version (1)
    3       1     kind (FrameKind)
    4       4     length of the payload, little-endian u32
    8       8     sequence number, little-endian u64, +1 per frame per direction

The sequence number lets the receiver notice a dropped, repeated or
reordered frame even where the payload is not authenticated (``plain``);
confidential technologies authenticate their payloads themselves.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

from vmmig.errors import VmmigError


__all__ = ["FRAME_HEADER", "MAX_PAYLOAD", "FrameHeader", "FrameKind", "ProtocolError"]

FRAME_HEADER: Final = struct.Struct("<2sBBIQ")
MAGIC: Final = b"VM"
VERSION: Final = 1
#: Larger payloads are refused: a corrupt length must not make us allocate gigabytes.
MAX_PAYLOAD: Final = 64 << 20


class ProtocolError(VmmigError):
    """The peer sent something that is not a valid frame."""


class FrameKind(enum.IntEnum):
    """What a frame carries."""

    #: JSON: who is talking, protocol version, what it offers.
    HELLO = 1
    #: A batch of pages: technology-defined payload (plain: u64 GPAs, then pages).
    PAGES = 2
    #: JSON: a precopy round ended (round number, counters).
    ROUND_END = 3
    #: Technology-defined CPU and device state.
    CPU_STATE = 4
    #: JSON: a technology-defined control message (manifest, commit, ...).
    CONTROL = 5
    #: JSON: the sender gives up, with a reason.
    ABORT = 6
    #: JSON: the sender is done; nothing follows.
    DONE = 7


@attrs.frozen
class FrameHeader:
    """A decoded header."""

    kind: FrameKind
    length: int
    sequence: int

    def pack(self) -> bytes:
        """The 16 header bytes."""
        return FRAME_HEADER.pack(MAGIC, VERSION, self.kind, self.length, self.sequence)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, *, expected_sequence: int) -> FrameHeader:
        """Decode and validate a header.

        :param expected_sequence: the sequence number the next frame must carry.
        :raises ProtocolError: bad magic, version, kind, length or sequence.
        """
        magic, version, kind, length, sequence = FRAME_HEADER.unpack(data)
        if magic != MAGIC:
            raise ProtocolError(f"not a vmmig channel frame (magic {bytes(magic)!r})")
        if version != VERSION:
            raise ProtocolError(f"channel version {version} is not supported (we speak {VERSION})")
        try:
            frame_kind = FrameKind(kind)
        except ValueError:
            raise ProtocolError(f"unknown frame kind {kind}") from None
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
        if sequence != expected_sequence:
            raise ProtocolError(f"frame {sequence} arrived where frame {expected_sequence} was "
                                "due (dropped, repeated or reordered)")
        return cls(frame_kind, length, sequence)
