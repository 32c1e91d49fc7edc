"""The manifest's keyed memory digest (ABI §4.3): GMAC per 1 GiB chunk, SHA-256 of the tags."""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmmig.firmware import manifest
from vmmig.firmware.manifest import memory_digest


KEY = bytes(range(32))


def ram(pages: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (pages, 4096), dtype=np.uint8)


def test_the_digest_is_the_sha256_of_the_chunks_gmac_tags(monkeypatch):
    """Written out from the ABI text, with 3-page chunks so that RAM spans several."""
    monkeypatch.setattr(manifest, "_DIGEST_CHUNK", 3 * 4096)
    memory = ram(7)
    flat = memory.reshape(-1).tobytes()
    tags = b"".join(
        AESGCM(KEY).encrypt(b"vmmig-mem" + i.to_bytes(3, "big"), b"", flat[start:start + 3 * 4096])
        for i, start in enumerate(range(0, len(flat), 3 * 4096)))
    assert memory_digest(KEY, memory) == hashlib.sha256(tags).digest()


def test_one_flipped_bit_anywhere_changes_the_digest():
    memory = ram(64)
    before = memory_digest(KEY, memory)
    memory[37, 4095] ^= 0x10
    assert memory_digest(KEY, memory) != before


def test_the_digest_depends_on_the_key():
    """Another session's key gives another digest: no value carries over."""
    memory = ram(4)
    assert memory_digest(KEY, memory) != memory_digest(bytes(32), memory)


def test_pages_swapped_change_the_digest():
    memory = ram(8)
    before = memory_digest(KEY, memory)
    memory[[2, 5]] = memory[[5, 2]]
    assert memory_digest(KEY, memory) != before
