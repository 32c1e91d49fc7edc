"""The memory controller's encryption of private guest pages: AES-XEX with address tweaks.

SEV encrypts each 16-byte block of a private page with the guest's VEK and
a tweak derived from the block's physical address, so that ciphertext moved
to another address (or another VM, with another VEK) decrypts to garbage.
We model it as XEX: for a block at address ``a``,

    T = AES-ECB(K2, a as a 16-byte little-endian block)
    C = AES-ECB(K1, P xor T) xor T

with ``K1 = VEK[:16]`` and ``K2 = VEK[16:]`` (SEV uses AES-128).  Every
tweak of a batch comes from one ECB call over the batch's block addresses
and the XORs are done by numpy, so a batch of pages costs three AES passes
in C instead of one cipher object per page (15 us each; see machine-facts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


__all__ = ["BLOCK", "PAGE", "Xex"]

PAGE = 4096
BLOCK = 16
_BLOCKS_PER_PAGE = PAGE // BLOCK
_BLOCK_OFFSETS = np.arange(_BLOCKS_PER_PAGE, dtype=np.uint64) * BLOCK


class Xex:
    """Encrypts and decrypts whole pages at their guest-physical addresses.

    :param vek: the 32-byte VM encryption key; it never leaves this object.
    """

    def __init__(self, vek: bytes) -> None:
        if len(vek) != 32:
            raise ValueError("a VEK is 32 bytes (two AES-128 keys)")
        # ECB is only the block primitive here: XEX whitens every block with its own tweak.
        self._data_key = Cipher(algorithms.AES(vek[:16]), modes.ECB())  # noqa: S305
        self._tweak_key = Cipher(algorithms.AES(vek[16:]), modes.ECB())  # noqa: S305

    def _tweaks(self, gpas: Sequence[int] | np.ndarray) -> np.ndarray:
        addresses = np.zeros((len(gpas) * _BLOCKS_PER_PAGE, 2), dtype=np.uint64)
        starts = np.asarray(gpas, dtype=np.uint64)
        addresses[:, 0] = (starts[:, None] + _BLOCK_OFFSETS[None, :]).reshape(-1)
        encryptor = self._tweak_key.encryptor()
        # x86 is little-endian: the array's memory already is the byte layout wanted.
        return np.frombuffer(encryptor.update(addresses.tobytes()), dtype=np.uint64)

    def _apply(self, data: bytes, gpas: Sequence[int] | np.ndarray, *, encrypt: bool) -> bytes:
        if len(data) != len(gpas) * PAGE:
            raise ValueError(f"{len(data)} bytes is not {len(gpas)} whole pages")
        if not len(gpas):
            return b""
        tweaks = self._tweaks(gpas)
        # XOR 8 bytes at a time: the whitening is the costly part besides AES.
        whitened = np.frombuffer(data, dtype=np.uint64) ^ tweaks
        context = self._data_key.encryptor() if encrypt else self._data_key.decryptor()
        core = np.frombuffer(context.update(whitened.tobytes()), dtype=np.uint64)
        result: bytes = (core ^ tweaks).tobytes()
        return result

    def encrypt_pages(self, plaintext: bytes, gpas: Sequence[int] | np.ndarray) -> bytes:
        """Ciphertext of consecutive pages, page ``i`` at guest address ``gpas[i]``."""
        return self._apply(plaintext, gpas, encrypt=True)

    def decrypt_pages(self, ciphertext: bytes, gpas: Sequence[int] | np.ndarray) -> bytes:
        """Plaintext of pages encrypted at ``gpas`` (garbage if they came from elsewhere)."""
        return self._apply(ciphertext, gpas, encrypt=False)
