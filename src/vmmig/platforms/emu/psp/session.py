"""The session that carries the transport keys TEK and TIK to a PSP.

Used twice with the same construction: the guest owner opens a session to
the PSP for LAUNCH_START, and a source PSP opens one to the target PSP for
SEND_START / RECEIVE_START.  The opener makes an ephemeral P-384 key ("DH
cert", a SEV certificate with usage PDH and no signatures), then::

    Z      = ECDH(ephemeral private, peer PDH): the x coordinate, 48 bytes big-endian
    master = KDF(Z,      "sev-master-secret", context = NONCE)   16 bytes
    KEK    = KDF(master, "sev-kek")                              16 bytes
    KIK    = KDF(master, "sev-kik")                              16 bytes

(KDF: :func:`.primitives.kdf`.)  Session blob, 0x80 bytes (SEV_SESSION_BUF)::

    offset  size  field
    0x00    16    NONCE       random
    0x10    32    WRAP_TK     AES-128-CTR(KEK, WRAP_IV, TEK || TIK)
    0x30    16    WRAP_IV     random
    0x40    32    WRAP_MAC    HMAC-SHA256(KIK, WRAP_TK)
    0x60    32    POLICY_MAC  HMAC-SHA256(TIK, POLICY as LE32)

The receiving PSP checks WRAP_MAC before unwrapping and POLICY_MAC after, so
a hypervisor that changes the policy between the owner and the PSP is caught.
"""

from __future__ import annotations

import hmac
import os
from typing import Final

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from vmmig.platforms.emu.psp.policy import Policy
from vmmig.platforms.emu.psp.primitives import aes128_ctr, hmac_sha256, kdf
from vmmig.platforms.emu.psp.sev_cert import Usage, make_sev_cert
from vmmig.platforms.emu.psp.status import PspError, PspStatus


__all__ = [
    "SESSION_SIZE",
    "SessionBlob",
    "TransportKeys",
    "ecdh_secret",
    "open_session",
    "unwrap_session",
    "wrap_session",
]

SESSION_SIZE: Final = 0x80


@attrs.frozen
class TransportKeys:
    """TEK (AES-128, encrypts) and TIK (HMAC-SHA256 key, authenticates)."""

    tek: bytes = attrs.field(repr=False)
    tik: bytes = attrs.field(repr=False)


@attrs.frozen
class SessionBlob:
    """The parsed session buffer (layout in the module docstring)."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def to_bytes(self) -> bytes:
        """The 0x80-byte buffer."""
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def from_bytes(cls, data: bytes) -> SessionBlob:
        """Split a buffer into its fields.

        :raises ValueError: if it is not 0x80 bytes.
        """
        if len(data) != SESSION_SIZE:
            raise ValueError(f"a session buffer is {SESSION_SIZE:#x} bytes, got {len(data):#x}")
        return cls(data[0:16], data[16:48], data[48:64], data[64:96], data[96:128])


def ecdh_secret(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """The shared secret Z: the x coordinate of the ECDH point, big-endian."""
    return private.exchange(ec.ECDH(), peer)


def _wrapping_keys(z: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    master = kdf(z, "sev-master-secret", nonce)
    return kdf(master, "sev-kek"), kdf(master, "sev-kik")


def wrap_session(
    z: bytes, *, nonce: bytes, wrap_iv: bytes, keys: TransportKeys, policy: Policy
) -> SessionBlob:
    """Build the session blob deterministically (callers supply fresh nonce and IV)."""
    kek, kik = _wrapping_keys(z, nonce)
    wrap_tk = aes128_ctr(kek, wrap_iv, keys.tek + keys.tik)
    return SessionBlob(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=hmac_sha256(kik, wrap_tk),
        policy_mac=hmac_sha256(keys.tik, policy.to_bytes()),
    )


def unwrap_session(z: bytes, blob: SessionBlob, policy: Policy) -> TransportKeys:
    """Recover TEK and TIK, checking WRAP_MAC and then POLICY_MAC.

    :raises PspError: BAD_MEASUREMENT if either MAC does not verify.
    """
    kek, kik = _wrapping_keys(z, blob.nonce)
    if not hmac.compare_digest(hmac_sha256(kik, blob.wrap_tk), blob.wrap_mac):
        raise PspError(
            PspStatus.BAD_MEASUREMENT,
            "WRAP_MAC does not verify: session not made for this PDH, or altered",
        )
    plain = aes128_ctr(kek, blob.wrap_iv, blob.wrap_tk)
    keys = TransportKeys(tek=plain[:16], tik=plain[16:])
    if not hmac.compare_digest(hmac_sha256(keys.tik, policy.to_bytes()), blob.policy_mac):
        raise PspError(
            PspStatus.BAD_MEASUREMENT, f"POLICY_MAC does not verify for policy {policy.value:#010x}"
        )
    return keys


def open_session(
    peer_pdh: ec.EllipticCurvePublicKey, keys: TransportKeys, policy: Policy
) -> tuple[bytes, bytes]:
    """Wrap ``keys`` to ``peer_pdh`` with a fresh ephemeral key, nonce and IV.

    :returns: (session blob, the ephemeral key's DH certificate).
    """
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    blob = wrap_session(
        ecdh_secret(ephemeral, peer_pdh),
        nonce=os.urandom(16),
        wrap_iv=os.urandom(16),
        keys=keys,
        policy=policy,
    )
    dh_cert = make_sev_cert(Usage.PDH, ephemeral.public_key()).to_bytes()
    return blob.to_bytes(), dh_cert
