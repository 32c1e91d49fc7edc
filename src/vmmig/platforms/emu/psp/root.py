"""The emulated AMD root of trust: the ARK and ASK keys shared by a deployment.

On real hardware AMD keeps these keys and publishes the ARK and ASK
certificates; every chip's CEK is signed by the ASK at manufacture.  Here one
:class:`EmulatedAmdRoot` plays AMD for all emulated hosts of a test
deployment: each host's PSP asks it once, when the host identity is created,
to endorse the new CEK.  The guest owner trusts :attr:`ark_public_key`.

State file ``<dir>/amd-root.json``: ``key_bits``, ``ark_key`` and ``ask_key``
(PKCS#8 PEM), ``ark_cert`` and ``ask_cert`` (base64 of the AMD certificate
format, see :mod:`.amd_cert`).

The key size defaults to AMD's current 4096 bits; 2048 bits (the Naples
generation's ARK/ASK, same format) is accepted for quick experiments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import rsa

from vmmig.errors import PlatformError
from vmmig.platforms.emu.psp.amd_cert import AmdCert, sign_amd_cert
from vmmig.platforms.emu.psp.sev_cert import SevCert, Usage, sign_sev_cert
from vmmig.platforms.emu.psp.store import (
    b64,
    locked,
    private_key_to_pem,
    read_state,
    rsa_key_from_pem,
    unb64,
    write_state,
)


__all__ = ["EmulatedAmdRoot"]

_STATE_FILE: Final = "amd-root.json"


class EmulatedAmdRoot:
    """The ARK -> ASK pair; signs CEKs for new emulated hosts.

    Build one with :meth:`generate` (in memory) or :meth:`load_or_create`.
    """

    def __init__(
        self,
        ark_key: rsa.RSAPrivateKey,
        ask_key: rsa.RSAPrivateKey,
        ark_cert: bytes,
        ask_cert: bytes,
    ) -> None:
        self._ask_key = ask_key
        self._ark_key = ark_key
        #: The self-signed ARK certificate (AMD format).
        self.ark_cert = ark_cert
        #: The ASK certificate, signed by the ARK (AMD format).
        self.ask_cert = ask_cert

    @property
    def ark_public_key(self) -> rsa.RSAPublicKey:
        """The key a guest owner pins as its trust anchor."""
        return self._ark_key.public_key()

    @property
    def key_bits(self) -> int:
        """The RSA key size of the ARK and ASK."""
        return self._ark_key.key_size

    @classmethod
    def generate(cls, *, key_bits: int = 4096) -> EmulatedAmdRoot:
        """Make fresh ARK and ASK keys and certificates (about 1-2 s at 4096 bits)."""
        if key_bits not in (2048, 4096):
            raise ValueError(f"AMD root keys are 2048 or 4096 bits, not {key_bits}")
        ark_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        ask_key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
        ark_id, ask_id = os.urandom(16), os.urandom(16)
        ark = sign_amd_cert(AmdCert(Usage.ARK, ark_id, ark_id, ark_key.public_key()), ark_key)
        ask = sign_amd_cert(AmdCert(Usage.ASK, ask_id, ark_id, ask_key.public_key()), ark_key)
        return cls(ark_key, ask_key, ark.to_bytes(), ask.to_bytes())

    @classmethod
    def load_or_create(cls, state_dir: Path, *, key_bits: int = 4096) -> EmulatedAmdRoot:
        """Load the root kept in ``state_dir``, creating it on first use.

        :raises PlatformError: if the stored root has another key size.
        """
        path = state_dir / _STATE_FILE
        with locked(state_dir, _STATE_FILE):
            state = read_state(path)
            if state is None:
                root = cls.generate(key_bits=key_bits)
                write_state(path, root._state())
                return root
        if state["key_bits"] != key_bits:
            raise PlatformError(
                f"{path}: the stored root is {state['key_bits']}-bit, not {key_bits}-bit"
            )
        return cls(
            rsa_key_from_pem(state["ark_key"]),
            rsa_key_from_pem(state["ask_key"]),
            unb64(state["ark_cert"]),
            unb64(state["ask_cert"]),
        )

    def _state(self) -> dict[str, object]:
        return {
            "key_bits": self.key_bits,
            "ark_key": private_key_to_pem(self._ark_key),
            "ask_key": private_key_to_pem(self._ask_key),
            "ark_cert": b64(self.ark_cert),
            "ask_cert": b64(self.ask_cert),
        }

    def endorse_cek(self, cek: SevCert) -> SevCert:
        """Sign a chip's CEK with the ASK, as AMD does at manufacture."""
        if cek.usage is not Usage.CEK:
            raise ValueError(f"the ASK endorses CEKs only, not a {cek.usage.name}")
        return sign_sev_cert(cek, Usage.ASK, self._ask_key)
