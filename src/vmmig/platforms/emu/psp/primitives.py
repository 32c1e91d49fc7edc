"""The symmetric primitives of the SEV API: HMAC-SHA256, AES-128-CTR and the KDF.

The KDF is NIST SP 800-108 section 5.1 (counter mode) with HMAC-SHA256 as the
PRF, in the byte order AMD's firmware and virtee/sev (``src/session/key.rs``)
use: for i = 1, 2, ...::

    K(i) = HMAC-SHA256(key, i (LE32) || label (ASCII) || 0x00 || context || L (LE32))

where L is the output length in bits; the output is K(1) || K(2) || ...
truncated to the requested length.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


__all__ = ["aes128_ctr", "hmac_sha256", "kdf"]

_SHA256_BYTES = 32


def hmac_sha256(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts``."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR with a 128-bit big-endian counter block starting at ``iv``.

    Encryption and decryption are the same operation.
    """
    if len(key) != 16:
        raise ValueError(f"AES-128 needs a 16-byte key, got {len(key)}")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def kdf(key: bytes, label: str, context: bytes = b"", length: int = 16) -> bytes:
    """Derive ``length`` bytes from ``key`` (SP 800-108 counter mode, see module doc)."""
    bits = struct.pack("<I", length * 8)
    label_bytes = label.encode("ascii")
    blocks = []
    for counter in range(1, -(-length // _SHA256_BYTES) + 1):
        blocks.append(
            hmac_sha256(key, struct.pack("<I", counter), label_bytes, b"\0", context, bits)
        )
    return b"".join(blocks)[:length]
