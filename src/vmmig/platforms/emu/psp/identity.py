"""A host's PSP identity: its certificate chain and PDH key, persisted per host.

Created once per host (state directory) and loaded by every machine process
on that host, so all of them present the same PDH and chain::

    CEK  P-384, the "chip" key, endorsed by the emulated AMD ASK
    OCA  P-384, self-signed: the platform is self-owned (the PSP makes its own
         OCA, as real firmware does until an owner imports one with
         PEK_CERT_IMPORT, which is not emulated)
    PEK  P-384, signed by the OCA and the CEK; records the firmware API version
    PDH  P-384 ECDH, signed by the PEK

State file ``<dir>/psp-identity.json``: ``host_name``, ``firmware`` ([major,
minor, build]), ``pdh_key`` (PKCS#8 PEM) and the six certificates (base64).
Only the PDH private key is kept: the CEK, OCA and PEK keys sign once, at
creation, and are then dropped, which keeps the secret material on disk to
the one key the PSP uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec

from vmmig.errors import PlatformError
from vmmig.platforms.emu.psp.amd_cert import AmdCert
from vmmig.platforms.emu.psp.chain import ChainError, PlatformChain, verify_chain
from vmmig.platforms.emu.psp.policy import FirmwareVersion
from vmmig.platforms.emu.psp.root import EmulatedAmdRoot
from vmmig.platforms.emu.psp.session import ecdh_secret
from vmmig.platforms.emu.psp.sev_cert import Usage, make_sev_cert, sign_sev_cert
from vmmig.platforms.emu.psp.store import (
    b64,
    ec_key_from_pem,
    locked,
    private_key_to_pem,
    read_state,
    unb64,
    write_state,
)


__all__ = ["DEFAULT_FIRMWARE", "PlatformIdentity"]

#: The firmware version the emulated PSP reports unless told otherwise.
DEFAULT_FIRMWARE: Final = FirmwareVersion(1, 55, 21)

_STATE_FILE: Final = "psp-identity.json"
_CERTS: Final = ("pdh", "pek", "oca", "cek", "ask", "ark")


class PlatformIdentity:
    """The chain and PDH private key of one host's PSP."""

    def __init__(
        self,
        host_name: str,
        firmware: FirmwareVersion,
        chain: PlatformChain,
        pdh_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.host_name = host_name
        self.firmware = firmware
        self.chain = chain
        self._pdh_key = pdh_key
        self.ark_public_key = AmdCert.parse_prefix(chain.ark)[0].public_key

    @classmethod
    def create(
        cls, host_name: str, root: EmulatedAmdRoot, firmware: FirmwareVersion = DEFAULT_FIRMWARE
    ) -> PlatformIdentity:
        """Make fresh keys and certificates, the CEK endorsed by ``root``."""
        cek_key, oca_key, pek_key, pdh_key = (
            ec.generate_private_key(ec.SECP384R1()) for _ in range(4)
        )
        cek = root.endorse_cek(make_sev_cert(Usage.CEK, cek_key.public_key()))
        oca = sign_sev_cert(make_sev_cert(Usage.OCA, oca_key.public_key()), Usage.OCA, oca_key)
        pek = make_sev_cert(
            Usage.PEK,
            pek_key.public_key(),
            api_major=firmware.api_major,
            api_minor=firmware.api_minor,
        )
        pek = sign_sev_cert(sign_sev_cert(pek, Usage.OCA, oca_key), Usage.CEK, cek_key)
        pdh = sign_sev_cert(make_sev_cert(Usage.PDH, pdh_key.public_key()), Usage.PEK, pek_key)
        chain = PlatformChain(
            pdh.to_bytes(),
            pek.to_bytes(),
            oca.to_bytes(),
            cek.to_bytes(),
            root.ask_cert,
            root.ark_cert,
        )
        return cls(host_name, firmware, chain, pdh_key)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        *,
        host_name: str,
        root: EmulatedAmdRoot | None = None,
        firmware: FirmwareVersion | None = None,
    ) -> PlatformIdentity:
        """Load the identity kept in ``state_dir``, creating it on first use.

        :param root: the AMD root; needed to create, checked against when loading.
        :param firmware: the firmware version; None means the stored one (or
            :data:`DEFAULT_FIRMWARE` when creating).
        :raises PlatformError: if the directory belongs to another host, another
            AMD root or another firmware version, if its chain no longer
            verifies, or if it is empty and no root was given.
        """
        path = state_dir / _STATE_FILE
        with locked(state_dir, _STATE_FILE):
            state = read_state(path)
            if state is None:
                if root is None:
                    raise PlatformError(
                        f"{state_dir}: no PSP identity yet, and no AMD root to endorse a new CEK"
                    )
                identity = cls.create(host_name, root, firmware or DEFAULT_FIRMWARE)
                write_state(path, identity._state())
                return identity
        identity = cls(
            state["host_name"],
            FirmwareVersion(*state["firmware"]),
            PlatformChain(**{name: unb64(state[name]) for name in _CERTS}),
            ec_key_from_pem(state["pdh_key"]),
        )
        identity._check_loaded(path, host_name, root, firmware)
        return identity

    def _check_loaded(
        self,
        path: Path,
        host_name: str,
        root: EmulatedAmdRoot | None,
        firmware: FirmwareVersion | None,
    ) -> None:
        if self.host_name != host_name:
            raise PlatformError(f"{path} belongs to host {self.host_name!r}, not {host_name!r}")
        if firmware is not None and firmware != self.firmware:
            raise PlatformError(f"{path} was made for firmware {self.firmware}, not {firmware}")
        if root is not None and root.ark_cert != self.chain.ark:
            raise PlatformError(f"{path} was endorsed by another AMD root")
        try:
            pdh = verify_chain(self.chain, self.ark_public_key)
        except ChainError as err:
            raise PlatformError(f"{path}: stored chain is broken: {err}") from None
        if pdh.key.public_numbers() != self._pdh_key.public_key().public_numbers():
            raise PlatformError(f"{path}: the PDH key does not match the PDH certificate")

    def _state(self) -> dict[str, object]:
        state: dict[str, object] = {name: b64(getattr(self.chain, name)) for name in _CERTS}
        state["host_name"] = self.host_name
        state["firmware"] = [self.firmware.api_major, self.firmware.api_minor, self.firmware.build]
        state["pdh_key"] = private_key_to_pem(self._pdh_key)
        return state

    def pdh_secret(self, peer: ec.EllipticCurvePublicKey) -> bytes:
        """Z = ECDH(PDH private key, ``peer``), as LAUNCH_START and RECEIVE_START derive it."""
        return ecdh_secret(self._pdh_key, peer)
