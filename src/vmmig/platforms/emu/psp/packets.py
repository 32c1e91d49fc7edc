"""Packet headers, the launch measurement, and the MACs that bind them.

Packet header (SEV_HDR_BUF), 0x34 bytes, used by LAUNCH_SECRET and by
SEND/RECEIVE_UPDATE_DATA and _VMSA::

    offset  size  field
    0x00    4     FLAGS  LE32; bit 0 = COMPRESSED (not supported here: must be 0)
    0x04    16    IV     AES-128-CTR initial counter block for the payload
    0x14    32    MAC    HMAC-SHA256 keyed with the TIK, input below

LAUNCH_SECRET (James Bottomley's ``sevsecret``, virtee/sev ``Session::secret``)::

    MAC = HMAC(TIK, 0x01 || FLAGS || IV || GUEST_LENGTH (LE32) || TRANS_LENGTH (LE32)
                    || ciphertext || MEASURE)

SEND/RECEIVE_UPDATE_DATA and _VMSA: our construction.  No public source we
could find spells out the spec's MAC input for these commands, so we use the
LAUNCH_SECRET shape with its own domain byte (0x02 data, 0x03 VMSA) and
without a measurement::

    MAC = HMAC(TIK, domain || FLAGS || IV || GUEST_LENGTH || TRANS_LENGTH || ciphertext)

Like the spec's packets, it does not bind the guest address, a sequence
number or the vCPU index: the hypervisor chooses where a packet lands on the
target.  (The Migration Handler's records do bind them; see DESIGN.md.)

Measurement blob (LAUNCH_MEASURE's output, SEV_MEASURE_BUF), 0x30 bytes::

    0x00  32  MEASURE  HMAC(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD
                            || POLICY (LE32) || LAUNCH_DIGEST || MNONCE)
    0x20  16  MNONCE   random, fresh per LAUNCH_MEASURE

LAUNCH_DIGEST is SHA-256 over everything LAUNCH_UPDATE_DATA and
LAUNCH_UPDATE_VMSA received, in order.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

from vmmig.platforms.emu.psp.policy import FirmwareVersion, Policy
from vmmig.platforms.emu.psp.primitives import hmac_sha256


__all__ = [
    "HEADER_SIZE",
    "MEASUREMENT_SIZE",
    "Measurement",
    "PacketHeader",
    "TransportKind",
    "measurement_mac",
    "secret_mac",
    "transport_mac",
]

HEADER_SIZE: Final = 0x34
MEASUREMENT_SIZE: Final = 0x30


class TransportKind(enum.IntEnum):
    """Domain-separation byte of a transport packet's MAC."""

    DATA = 0x02
    VMSA = 0x03


@attrs.frozen
class PacketHeader:
    """A parsed packet header (layout in the module docstring)."""

    flags: int
    iv: bytes
    mac: bytes

    def to_bytes(self) -> bytes:
        """The 0x34-byte header."""
        return struct.pack("<I16s32s", self.flags, self.iv, self.mac)

    @classmethod
    def from_bytes(cls, data: bytes) -> PacketHeader:
        """Split a header into its fields.

        :raises ValueError: if it is not 0x34 bytes.
        """
        if len(data) != HEADER_SIZE:
            raise ValueError(f"a packet header is {HEADER_SIZE:#x} bytes, got {len(data):#x}")
        flags, iv, mac = struct.unpack("<I16s32s", data)
        return cls(flags, iv, mac)


@attrs.frozen
class Measurement:
    """LAUNCH_MEASURE's result: the 32-byte MAC and the 16-byte nonce."""

    measure: bytes
    mnonce: bytes

    def to_bytes(self) -> bytes:
        """MEASURE || MNONCE (what ``query-sev-launch-measure`` returns, base64)."""
        return self.measure + self.mnonce

    @classmethod
    def from_bytes(cls, data: bytes) -> Measurement:
        """Split a measurement blob.

        :raises ValueError: if it is not 0x30 bytes.
        """
        if len(data) != MEASUREMENT_SIZE:
            raise ValueError(f"a measurement is {MEASUREMENT_SIZE:#x} bytes, got {len(data):#x}")
        return cls(data[:32], data[32:])


def _lengths(guest_length: int, trans_length: int) -> bytes:
    return struct.pack("<II", guest_length, trans_length)


def secret_mac(tik: bytes, flags: int, iv: bytes, ciphertext: bytes, measure: bytes) -> bytes:
    """The LAUNCH_SECRET header MAC (plaintext and ciphertext lengths are equal in CTR)."""
    return hmac_sha256(
        tik,
        b"\x01",
        struct.pack("<I", flags),
        iv,
        _lengths(len(ciphertext), len(ciphertext)),
        ciphertext,
        measure,
    )


def transport_mac(
    tik: bytes, kind: TransportKind, flags: int, iv: bytes, ciphertext: bytes
) -> bytes:
    """The MAC of a SEND/RECEIVE_UPDATE_DATA or _VMSA packet."""
    return hmac_sha256(
        tik,
        bytes([kind]),
        struct.pack("<I", flags),
        iv,
        _lengths(len(ciphertext), len(ciphertext)),
        ciphertext,
    )


def measurement_mac(
    tik: bytes, firmware: FirmwareVersion, policy: Policy, launch_digest: bytes, mnonce: bytes
) -> bytes:
    """MEASURE: the launch measurement HMAC."""
    version = bytes([firmware.api_major, firmware.api_minor, firmware.build])
    return hmac_sha256(tik, b"\x04", version, policy.to_bytes(), launch_digest, mnonce)
