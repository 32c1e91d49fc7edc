"""A platform's certificate chain and its verification, as the guest owner does it.

Who signs whom::

    ARK --signs--> ARK (self), ASK
    ASK --------> CEK                (AMD endorses the chip)
    OCA --------> OCA (self), PEK    (the platform owner endorses the PEK)
    CEK --------> PEK                (the chip endorses the PEK)
    PEK --------> PDH                (the key the owner's session is wrapped to)

A PEK carries two signatures, one by the OCA and one by the CEK; both must
verify.  The owner trusts only the ARK's public key, obtained out of band
(for a real chip, from AMD's key server; here, from :class:`EmulatedAmdRoot`).
The buffers follow the SEV API: PDH_CERT_EXPORT and SEND_START's PLAT_CERT
hold PEK || OCA || CEK; SEND_START's AMD_CERT holds ASK || ARK.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vmmig.errors import VmmigError
from vmmig.platforms.emu.psp.amd_cert import AmdCert, verify_amd_cert
from vmmig.platforms.emu.psp.sev_cert import (
    SEV_CERT_SIZE,
    Algo,
    SevCert,
    Usage,
    verify_sev_signature,
)


__all__ = ["ChainError", "PdhPublicKey", "PlatformChain", "verify_chain"]

_T = TypeVar("_T")


class ChainError(VmmigError):
    """A certificate chain does not verify.

    :param link: the failing link, e.g. ``"ASK -> CEK"`` or ``"PDH"``.
    :param problem: what is wrong with it.
    :param bad_signature: True when a signature failed, False when a
        certificate is malformed or has the wrong role.
    """

    def __init__(self, link: str, problem: str, *, bad_signature: bool = False) -> None:
        super().__init__(f"certificate chain: {link}: {problem}")
        self.link = link
        self.problem = problem
        self.bad_signature = bad_signature


@attrs.frozen
class PdhPublicKey:
    """A verified PDH: its certificate, key, and the API version its PEK states."""

    cert: bytes = attrs.field(repr=False)
    key: ec.EllipticCurvePublicKey = attrs.field(eq=False, repr=False)
    api_major: int
    api_minor: int


@attrs.frozen
class PlatformChain:
    """The certificates of one platform, each in its spec format."""

    pdh: bytes = attrs.field(repr=False)
    pek: bytes = attrs.field(repr=False)
    oca: bytes = attrs.field(repr=False)
    cek: bytes = attrs.field(repr=False)
    ask: bytes = attrs.field(repr=False)
    ark: bytes = attrs.field(repr=False)

    @property
    def plat_certs(self) -> bytes:
        """PEK || OCA || CEK (PDH_CERT_EXPORT's CERTS, SEND_START's PLAT_CERT)."""
        return self.pek + self.oca + self.cek

    @property
    def amd_certs(self) -> bytes:
        """ASK || ARK (SEND_START's AMD_CERT)."""
        return self.ask + self.ark

    @classmethod
    def from_buffers(cls, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> PlatformChain:
        """Split the SEND_START buffers into certificates.

        :raises ChainError: if a buffer has the wrong length.
        """
        if len(plat_certs) != 3 * SEV_CERT_SIZE:
            raise ChainError(
                "PEK/OCA/CEK", f"expected {3 * SEV_CERT_SIZE} bytes, got {len(plat_certs)}"
            )
        ask_size = _parse("ASK", lambda: AmdCert.parse_prefix(amd_certs))[1]
        ark_size = _parse("ARK", lambda: AmdCert.parse_prefix(amd_certs[ask_size:]))[1]
        if ask_size + ark_size != len(amd_certs):
            raise ChainError("ASK/ARK", f"{len(amd_certs) - ask_size - ark_size} trailing bytes")
        pek, oca, cek = (
            plat_certs[i : i + SEV_CERT_SIZE] for i in range(0, len(plat_certs), SEV_CERT_SIZE)
        )
        return cls(pdh, pek, oca, cek, amd_certs[:ask_size], amd_certs[ask_size:])


def _parse(name: str, parse: Callable[[], _T]) -> _T:
    try:
        return parse()
    except ValueError as err:
        raise ChainError(name, str(err)) from None


def _sev(name: str, data: bytes, usage: Usage) -> SevCert:
    cert = _parse(name, lambda: SevCert.from_bytes(data))
    if cert.usage is not usage:
        raise ChainError(name, f"key usage is {cert.usage.name}, expected {usage.name}")
    return cert


def _amd(name: str, data: bytes, usage: Usage) -> AmdCert:
    cert, size = _parse(name, lambda: AmdCert.parse_prefix(data))
    if size != len(data):
        raise ChainError(name, f"{len(data) - size} trailing bytes")
    if cert.usage is not usage:
        raise ChainError(name, f"key usage is {cert.usage.name}, expected {usage.name}")
    return cert


def _signed(
    link: str, cert: SevCert, usage: Usage, signer: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
) -> None:
    if not verify_sev_signature(cert, usage, signer):
        raise ChainError(link, f"no valid {usage.name} signature", bad_signature=True)


def verify_chain(chain: PlatformChain, trusted_ark_public_key: rsa.RSAPublicKey) -> PdhPublicKey:
    """Verify every link from the trusted ARK to the PDH; return the PDH key.

    :raises ChainError: naming the first link that fails.
    """
    ark = _amd("ARK", chain.ark, Usage.ARK)
    if ark.public_key.public_numbers() != trusted_ark_public_key.public_numbers():
        raise ChainError("ARK", "is not the trusted AMD root key")
    if ark.certifying_id != ark.key_id:
        raise ChainError("ARK -> ARK", "ARK's certifying id is not its own key id")
    if not verify_amd_cert(ark, ark.public_key):
        raise ChainError("ARK -> ARK", "self-signature does not verify", bad_signature=True)
    ask = _amd("ASK", chain.ask, Usage.ASK)
    if ask.certifying_id != ark.key_id:
        raise ChainError("ARK -> ASK", "ASK's certifying id is not the ARK's key id")
    if not verify_amd_cert(ask, ark.public_key):
        raise ChainError("ARK -> ASK", "signature does not verify", bad_signature=True)
    cek = _sev("CEK", chain.cek, Usage.CEK)
    _signed("ASK -> CEK", cek, Usage.ASK, ask.public_key)
    oca = _sev("OCA", chain.oca, Usage.OCA)
    _signed("OCA -> OCA", oca, Usage.OCA, oca.public_key)
    pek = _sev("PEK", chain.pek, Usage.PEK)
    _signed("OCA -> PEK", pek, Usage.OCA, oca.public_key)
    _signed("CEK -> PEK", pek, Usage.CEK, cek.public_key)
    pdh = _sev("PDH", chain.pdh, Usage.PDH)
    if pdh.algo not in (Algo.ECDH_SHA256, Algo.ECDH_SHA384):
        raise ChainError("PDH", f"key algorithm is {pdh.algo.name}, expected ECDH")
    _signed("PEK -> PDH", pdh, Usage.PEK, pek.public_key)
    return PdhPublicKey(chain.pdh, pdh.public_key, pek.api_major, pek.api_minor)
