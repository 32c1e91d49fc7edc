"""The guest owner's side of a launch: pure functions, no PSP state.

The owner (the tenant's key service) uses these against an emulated or a real
PSP; the formats are the SEV API's (see :mod:`.session` and :mod:`.packets`)::

    pdh = verify_chain(chain, trusted_ark)             # chain from the host
    session, dh_cert, tek, tik = build_launch_session(pdh, policy)
    ... host: LAUNCH_START, LAUNCH_UPDATE_DATA..., LAUNCH_MEASURE -> blob
    m = Measurement.from_bytes(blob)
    expected = expected_measurement(tik=tik, firmware=..., policy=policy,
                                    launch_digest=launch_digest(image), mnonce=m.mnonce)
    if hmac.compare_digest(expected, m.measure):
        header, ciphertext = build_secret_packet(tek, tik, m, secret)
        ... host: LAUNCH_SECRET(header, ciphertext, gpa), LAUNCH_FINISH

Return values are NamedTuples so that they unpack as above and still name
their fields.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import NamedTuple

from vmmig.platforms.emu.psp.chain import PdhPublicKey
from vmmig.platforms.emu.psp.packets import (
    Measurement,
    PacketHeader,
    measurement_mac,
    secret_mac,
)
from vmmig.platforms.emu.psp.policy import FirmwareVersion, Policy
from vmmig.platforms.emu.psp.primitives import aes128_ctr
from vmmig.platforms.emu.psp.session import TransportKeys, open_session


__all__ = [
    "LaunchSession",
    "SecretPacket",
    "build_launch_session",
    "build_secret_packet",
    "expected_measurement",
    "launch_digest",
]


class LaunchSession(NamedTuple):
    """What the owner hands to LAUNCH_START, and the keys it keeps."""

    #: The 0x80-byte session blob.
    session: bytes
    #: The owner's ephemeral P-384 key as an unsigned SEV certificate.
    dh_cert: bytes
    #: Transport encryption key (AES-128); keep it secret.
    tek: bytes
    #: Transport integrity key (HMAC-SHA256); keep it secret.
    tik: bytes


class SecretPacket(NamedTuple):
    """LAUNCH_SECRET's inputs."""

    #: The 0x34-byte packet header.
    header: bytes
    #: The secret, AES-128-CTR encrypted under the TEK.
    ciphertext: bytes


def build_launch_session(pdh: PdhPublicKey, policy: Policy) -> LaunchSession:
    """Make fresh TEK/TIK and wrap them to a verified PDH for LAUNCH_START."""
    keys = TransportKeys(tek=os.urandom(16), tik=os.urandom(16))
    session, dh_cert = open_session(pdh.key, keys, policy)
    return LaunchSession(session, dh_cert, keys.tek, keys.tik)


def launch_digest(chunks: Iterable[bytes]) -> bytes:
    """SHA-256 over the LAUNCH_UPDATE_DATA / _VMSA inputs, in launch order."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.digest()


def expected_measurement(
    *, tik: bytes, firmware: FirmwareVersion, policy: Policy, launch_digest: bytes, mnonce: bytes
) -> bytes:
    """The MEASURE a genuine PSP reports for this launch (compare in constant time)."""
    return measurement_mac(tik, firmware, policy, launch_digest, mnonce)


def build_secret_packet(
    tek: bytes, tik: bytes, measurement: Measurement | bytes, secret: bytes, flags: int = 0
) -> SecretPacket:
    """Encrypt ``secret`` for LAUNCH_SECRET into the VM that reported ``measurement``.

    :param measurement: the verified :class:`Measurement`, or its 32-byte MEASURE.
    :param flags: header FLAGS; the emulated PSP supports only 0 (no compression).
    """
    measure = measurement.measure if isinstance(measurement, Measurement) else measurement
    if len(measure) != 32:
        raise ValueError(f"MEASURE is 32 bytes, got {len(measure)} (pass the Measurement?)")
    iv = os.urandom(16)
    ciphertext = aes128_ctr(tek, iv, secret)
    header = PacketHeader(flags, iv, secret_mac(tik, flags, iv, ciphertext, measure))
    return SecretPacket(header.to_bytes(), ciphertext)
