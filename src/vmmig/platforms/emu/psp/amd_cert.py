"""AMD's own certificates (55766 appendix B.1): the ARK and the ASK.

The ARK (AMD Root Key) signs itself and the ASK (AMD SEV Signing Key); the
ASK signs each chip's CEK (a SEV certificate, see :mod:`.sev_cert`).  All
integers little-endian; n = MODULUS_SIZE / 8 (256 or 512 bytes)::

    offset      size  field
    0x00        4     VERSION         1
    0x04        16    KEY_ID          this key's id
    0x14        16    CERTIFYING_ID   the signer's KEY_ID (= KEY_ID when self-signed)
    0x24        4     KEY_USAGE       0x00 ARK, 0x13 ASK
    0x28        16    reserved, zero
    0x38        4     PUBEXP_SIZE     bits, equal to MODULUS_SIZE
    0x3C        4     MODULUS_SIZE    bits, 2048 or 4096
    0x40        n     PUBEXP          LE, zero-padded
    0x40+n      n     MODULUS         LE
    0x40+2n     n     SIGNATURE       LE integer; RSASSA-PSS over bytes 0x00..0x40+2n

The signature uses SHA-384 for 4096-bit keys and SHA-256 for 2048-bit keys,
MGF1 with the same hash and a salt as long as the digest (as virtee/sev
verifies real ARK/ASK certificates).  The signer's modulus must be the same
size as the subject's (true of every AMD ARK/ASK pair).
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vmmig.platforms.emu.psp.sev_cert import Algo, Usage, rsa_pss_hash


__all__ = ["AmdCert", "sign_amd_cert", "verify_amd_cert"]

_HEADER: Final = struct.Struct("<I16s16sI16sII")
_KEY_BITS: Final = frozenset({2048, 4096})


def _pss(key_bits: int) -> tuple[padding.PSS, hashes.HashAlgorithm]:
    digest: hashes.HashAlgorithm = (
        hashes.SHA384() if rsa_pss_hash(key_bits) is Algo.RSA_SHA384 else hashes.SHA256()
    )
    return padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size), digest


@attrs.frozen
class AmdCert:
    """A parsed ARK or ASK certificate; ``signature`` is empty until signed."""

    usage: Usage
    key_id: bytes
    certifying_id: bytes
    public_key: rsa.RSAPublicKey = attrs.field(eq=False, repr=False)
    signature: bytes = attrs.field(default=b"", repr=False)

    @property
    def key_bits(self) -> int:
        """The modulus size in bits."""
        return self.public_key.key_size

    def body(self) -> bytes:
        """Everything the signature covers (the certificate up to SIGNATURE)."""
        size = self.key_bits // 8
        numbers = self.public_key.public_numbers()
        head = _HEADER.pack(
            1, self.key_id, self.certifying_id, self.usage, bytes(16), self.key_bits, self.key_bits
        )
        return head + numbers.e.to_bytes(size, "little") + numbers.n.to_bytes(size, "little")

    def to_bytes(self) -> bytes:
        """The certificate bytes; the signature is zero-filled if missing."""
        return self.body() + self.signature.ljust(self.key_bits // 8, b"\0")

    @classmethod
    def parse_prefix(cls, data: bytes) -> tuple[AmdCert, int]:
        """Parse the certificate at the start of ``data``; return it and its length.

        :raises ValueError: naming the malformed field.
        """
        if len(data) < _HEADER.size:
            raise ValueError(f"an AMD certificate header is {_HEADER.size} bytes, got {len(data)}")
        version, key_id, certifying_id, usage, reserved, exp_bits, mod_bits = _HEADER.unpack_from(
            data
        )
        if version != 1:
            raise ValueError(f"certificate version {version}, expected 1")
        if usage not in (Usage.ARK, Usage.ASK):
            raise ValueError(f"key usage {usage:#x} is neither ARK (0x0) nor ASK (0x13)")
        if any(reserved):
            raise ValueError("reserved bytes 0x28-0x37 are not zero")
        if mod_bits not in _KEY_BITS or exp_bits != mod_bits:
            raise ValueError(f"key sizes {exp_bits}/{mod_bits} bits, expected 2048 or 4096 twice")
        size = mod_bits // 8
        total = _HEADER.size + 3 * size
        if len(data) < total:
            raise ValueError(f"a {mod_bits}-bit AMD certificate is {total} bytes, got {len(data)}")
        exponent = int.from_bytes(data[_HEADER.size : _HEADER.size + size], "little")
        modulus = int.from_bytes(data[_HEADER.size + size : _HEADER.size + 2 * size], "little")
        try:
            key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError:
            raise ValueError("the RSA public key is invalid") from None
        if key.key_size != mod_bits:
            raise ValueError(f"modulus is {key.key_size} bits, MODULUS_SIZE says {mod_bits}")
        signature = data[_HEADER.size + 2 * size : total]
        return cls(Usage(usage), key_id, certifying_id, key, signature), total


def sign_amd_cert(cert: AmdCert, signer: rsa.RSAPrivateKey) -> AmdCert:
    """Return ``cert`` signed by ``signer`` (same key size as the subject)."""
    if signer.key_size != cert.key_bits:
        raise ValueError(f"signer is {signer.key_size} bits, subject {cert.key_bits}")
    pss, digest = _pss(cert.key_bits)
    return attrs.evolve(cert, signature=signer.sign(cert.body(), pss, digest)[::-1])


def verify_amd_cert(cert: AmdCert, signer: rsa.RSAPublicKey) -> bool:
    """Whether ``cert`` carries a valid signature by ``signer``."""
    if signer.key_size != cert.key_bits:
        return False
    pss, digest = _pss(cert.key_bits)
    try:
        signer.verify(cert.signature[::-1], cert.body(), pss, digest)
    except InvalidSignature:
        return False
    return True
