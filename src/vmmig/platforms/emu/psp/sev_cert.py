"""SEV certificates (AMD 55766 appendix C): OCA, CEK, PEK, PDH and the owner's DH key.

One certificate is 0x824 bytes, all integers little-endian::

    offset  size   field
    0x000   4      VERSION        1
    0x004   1      API_MAJOR      firmware API of the PSP that made a PEK, else 0
    0x005   1      API_MINOR
    0x006   2      reserved, zero
    0x008   4      PUB_KEY_USAGE  :class:`Usage`
    0x00C   4      PUB_KEY_ALGO   :class:`Algo`
    0x010   0x404  PUB_KEY        ECDSA/ECDH public key:
                     0x010  4    CURVE  (2 = P-384)
                     0x014  72   QX     little-endian, zero-padded from 48 bytes
                     0x05C  72   QY
                     0x0A4  880  reserved, zero
    0x414   4      SIG1_USAGE     usage of the signing key (0x1000 = empty slot)
    0x418   4      SIG1_ALGO      (0 = empty slot)
    0x41C   0x200  SIG1           ECDSA: R (72, LE) || S (72, LE) || 368 zero bytes;
                                  RSA: the signature as one LE integer, zero-padded
    0x61C   4      SIG2_USAGE
    0x620   4      SIG2_ALGO
    0x624   0x200  SIG2
    0x824          end

Signatures cover the body, bytes 0x000-0x413.  ECDSA signs with SHA-256
(``ECDSA_SHA256``, as AMD's PSP and virtee/sev do); RSA signatures (the ASK
on the CEK) are RSASSA-PSS with MGF1 and a salt as long as the digest,
SHA-256 for a 2048-bit key and SHA-384 for a 4096-bit key.

Simplification: only P-384 EC keys are accepted in the key slot (the spec
also allows P-256 and RSA public keys there; no key of our chain uses them).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)


__all__ = [
    "SEV_CERT_SIZE",
    "Algo",
    "SevCert",
    "SignatureSlot",
    "Usage",
    "make_sev_cert",
    "rsa_pss_hash",
    "sign_sev_cert",
    "verify_sev_signature",
]

SEV_CERT_SIZE: Final = 0x824
_BODY_SIZE: Final = 0x414
_PUBKEY_SIZE: Final = 0x404
_SIG_SIZE: Final = 0x200
_COORD_SIZE: Final = 72
_P384_BYTES: Final = 48
_CURVE_P384: Final = 2


class Usage(enum.IntEnum):
    """Key usage codes (55766 appendix C.1; AMD certificates use ARK and ASK)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algo(enum.IntEnum):
    """Key and signature algorithm codes (55766 appendix C.1)."""

    NONE = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103


_EC_KEY_ALGOS: Final = frozenset(
    {Algo.ECDSA_SHA256, Algo.ECDSA_SHA384, Algo.ECDH_SHA256, Algo.ECDH_SHA384}
)
_HASHES: Final[dict[Algo, type[hashes.SHA256] | type[hashes.SHA384]]] = {
    Algo.RSA_SHA256: hashes.SHA256,
    Algo.ECDSA_SHA256: hashes.SHA256,
    Algo.RSA_SHA384: hashes.SHA384,
    Algo.ECDSA_SHA384: hashes.SHA384,
}

PrivateSigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicSigningKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def rsa_pss_hash(key_bits: int) -> Algo:
    """The RSA signature algorithm AMD pairs with a key size (SHA-384 for 4096 bits)."""
    return Algo.RSA_SHA384 if key_bits >= 4096 else Algo.RSA_SHA256


def _pss(algo: Algo) -> padding.PSS:
    digest = _HASHES[algo]()
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)


@attrs.frozen
class SignatureSlot:
    """One of the two signature slots; empty when usage is INVALID or algo NONE."""

    usage: int = Usage.INVALID
    algo: int = Algo.NONE
    data: bytes = bytes(_SIG_SIZE)

    @property
    def empty(self) -> bool:
        """Whether the slot holds no signature."""
        return self.usage == Usage.INVALID or self.algo == Algo.NONE


@attrs.frozen
class SevCert:
    """A parsed SEV certificate whose key is a P-384 point."""

    usage: Usage
    algo: Algo
    public_key: ec.EllipticCurvePublicKey = attrs.field(eq=False, repr=False)
    api_major: int = 0
    api_minor: int = 0
    sigs: tuple[SignatureSlot, SignatureSlot] = (SignatureSlot(), SignatureSlot())

    def body(self) -> bytes:
        """Bytes 0x000-0x413: what signatures cover."""
        numbers = self.public_key.public_numbers()
        key = struct.pack(
            "<I72s72s",
            _CURVE_P384,
            numbers.x.to_bytes(_P384_BYTES, "little"),
            numbers.y.to_bytes(_P384_BYTES, "little"),
        ).ljust(_PUBKEY_SIZE, b"\0")
        head = struct.pack("<IBBHII", 1, self.api_major, self.api_minor, 0, self.usage, self.algo)
        return head + key

    def to_bytes(self) -> bytes:
        """The 0x824-byte certificate."""
        slots = b"".join(struct.pack("<II", s.usage, s.algo) + s.data for s in self.sigs)
        return self.body() + slots

    @classmethod
    def from_bytes(cls, data: bytes) -> SevCert:
        """Parse and check a certificate's format (not its signatures).

        :raises ValueError: naming the malformed field.
        """
        if len(data) != SEV_CERT_SIZE:
            raise ValueError(f"a SEV certificate is {SEV_CERT_SIZE:#x} bytes, got {len(data):#x}")
        version, major, minor, reserved, usage, algo = struct.unpack_from("<IBBHII", data)
        if version != 1:
            raise ValueError(f"certificate version {version}, expected 1")
        if reserved:
            raise ValueError("reserved bytes 0x006-0x007 are not zero")
        try:
            key_usage, key_algo = Usage(usage), Algo(algo)
        except ValueError:
            raise ValueError(f"unknown key usage {usage:#x} or algorithm {algo:#x}") from None
        if key_algo not in _EC_KEY_ALGOS:
            raise ValueError(f"key algorithm {key_algo.name} is not an ECDSA/ECDH P-384 key")
        curve, qx, qy = struct.unpack_from("<I72s72s", data, 0x010)
        if curve != _CURVE_P384:
            raise ValueError(f"curve {curve}, only P-384 ({_CURVE_P384}) is supported")
        if any(data[0x0A4:_BODY_SIZE]) or any(qx[_P384_BYTES:]) or any(qy[_P384_BYTES:]):
            raise ValueError("reserved bytes of the public key are not zero")
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(qx[:_P384_BYTES], "little"),
                int.from_bytes(qy[:_P384_BYTES], "little"),
                ec.SECP384R1(),
            ).public_key()
        except ValueError:
            raise ValueError("the public key is not a point on P-384") from None
        sigs = []
        for offset in (_BODY_SIZE, _BODY_SIZE + 8 + _SIG_SIZE):
            sig_usage, sig_algo = struct.unpack_from("<II", data, offset)
            signature = data[offset + 8 : offset + 8 + _SIG_SIZE]
            sigs.append(SignatureSlot(sig_usage, sig_algo, signature))
        return cls(key_usage, key_algo, public_key, major, minor, (sigs[0], sigs[1]))


def make_sev_cert(
    usage: Usage, public_key: ec.EllipticCurvePublicKey, *, api_major: int = 0, api_minor: int = 0
) -> SevCert:
    """An unsigned certificate for a P-384 key (ECDH for a PDH, ECDSA otherwise)."""
    if not isinstance(public_key.curve, ec.SECP384R1):
        raise ValueError(f"SEV certificates here carry P-384 keys, not {public_key.curve.name}")
    algo = Algo.ECDH_SHA256 if usage is Usage.PDH else Algo.ECDSA_SHA256
    return SevCert(usage, algo, public_key, api_major, api_minor)


def sign_sev_cert(cert: SevCert, signer_usage: Usage, key: PrivateSigningKey) -> SevCert:
    """Return ``cert`` with a signature by ``key`` in its first empty slot.

    :raises ValueError: if both slots are taken.
    """
    body = cert.body()
    if isinstance(key, rsa.RSAPrivateKey):
        algo = rsa_pss_hash(key.key_size)
        raw = key.sign(body, _pss(algo), _HASHES[algo]())
        data = raw[::-1].ljust(_SIG_SIZE, b"\0")
    else:
        algo = Algo.ECDSA_SHA256
        r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256())))
        data = (r.to_bytes(_COORD_SIZE, "little") + s.to_bytes(_COORD_SIZE, "little")).ljust(
            _SIG_SIZE, b"\0"
        )
    slot = SignatureSlot(signer_usage, algo, data)
    if cert.sigs[0].empty:
        return attrs.evolve(cert, sigs=(slot, cert.sigs[1]))
    if cert.sigs[1].empty:
        return attrs.evolve(cert, sigs=(cert.sigs[0], slot))
    raise ValueError(f"{cert.usage.name} certificate has no free signature slot")


def verify_sev_signature(cert: SevCert, signer_usage: Usage, signer: PublicSigningKey) -> bool:
    """Whether a slot of ``cert`` holds a valid signature by ``signer`` of ``signer_usage``."""
    body = cert.body()
    for slot in cert.sigs:
        if slot.empty or slot.usage != signer_usage or slot.algo not in _HASHES:
            continue
        algo = Algo(slot.algo)
        try:
            if isinstance(signer, rsa.RSAPublicKey):
                if algo not in (Algo.RSA_SHA256, Algo.RSA_SHA384):
                    continue
                size = signer.key_size // 8
                signer.verify(slot.data[:size][::-1], body, _pss(algo), _HASHES[algo]())
            else:
                if algo not in (Algo.ECDSA_SHA256, Algo.ECDSA_SHA384):
                    continue
                r = int.from_bytes(slot.data[:_COORD_SIZE], "little")
                s = int.from_bytes(slot.data[_COORD_SIZE : 2 * _COORD_SIZE], "little")
                signer.verify(encode_dss_signature(r, s), body, ec.ECDSA(_HASHES[algo]()))
        except InvalidSignature:
            continue
        return True
    return False
