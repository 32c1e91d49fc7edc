"""The final manifest, and the receipts that end a session.

At the stop the source MH seals one manifest (kind MANIFEST, sequence 0,
manifest key); its body is 128 bytes::

    0    u64   RAM pages
    8    u64   data records sealed (page and CPU-state: the data stream's length)
    16   u64   pages exported in all (sum of all versions)
    24   u64   vCPU states exported (0 for an SEV guest)
    32   32    versions digest: SHA-256 of every page's version, u64 LE,
               in GPA order (page 0, 1, 2, ... of all RAM)
    64   32    memory digest of all RAM as of the stop (below)
    96   32    CPU digest: SHA-256 over the exported vCPUs in index order of
               ``u32 LE index || state``; all zero when no state was exported

The memory digest is keyed, so that it runs at AES-GCM's GHASH speed
(about 6 times SHA-256's here) and yet no host can steer it: RAM in GPA
order is cut into 64 MiB chunks; chunk *i* gets the GMAC tag of AES-256-GCM
under the session's ``memory`` key, nonce ``"vmmig-mem" || u24 BE i``, no
plaintext, the chunk as associated data; the digest is SHA-256 of the tags
in order.  Both MHs compute it and compare inside the sealed manifest, so
no tag is ever seen by the host.

The target accepts COMMIT only after it verified that it holds exactly this:
the same RAM size, every record (a truncated stream shows in the count),
every page at exactly the source's final version (nothing missing, nothing
extra, no stale page; the digest compares the whole table, so the manifest
keeps a fixed size however large the guest), memory whose digest is the
source's, and the same vCPU states.  The memory digest catches what versions
cannot: a page the guest wrote after its last export whose dirty bit the
(untrusted) host suppressed.  Without CPU state (SEV) the CPU fields are zero:
an SEV guest's body is byte for byte what it was when they were reserved.

Failures are reported as MISMATCH with ``detail`` bits
(:class:`MismatchBits`).

Receipts use the control key (target -> source), sequence 0 each:
the commit receipt's body is SHA-256 of the manifest body it answers; the
abort token's body is 32 zero bytes.  The source retires on a commit
receipt and may resume after its manifest only on an abort token, so the
host cannot run both copies of the guest without forging one of them.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmmig.firmware import envelope
from vmmig.firmware.abi import Refusal, Status
from vmmig.firmware.envelope import Direction, RecordKind
from vmmig.firmware.keys import SessionKeys


__all__ = [
    "MANIFEST_BODY_SIZE",
    "Manifest",
    "MismatchBits",
    "cpu_digest",
    "memory_digest",
    "open_abort_token",
    "open_commit_receipt",
    "open_manifest",
    "seal_abort_token",
    "seal_commit_receipt",
    "seal_manifest",
    "versions_digest",
]

_BODY = struct.Struct("<QQQQ32s32s32s")
#: Bytes of a manifest's plaintext body.
MANIFEST_BODY_SIZE: Final = _BODY.size
_RECEIPT_SIZE: Final = 32


class MismatchBits(enum.IntFlag):
    """``detail`` bits of a MISMATCH reply to MANIFEST."""

    RAM_SIZE = 1 << 0
    RECORD_COUNT = 1 << 1
    VERSIONS = 1 << 2
    MEMORY = 1 << 3
    #: vCPU states missing, extra or different (also IMPORT_CPU_STATE's detail).
    CPU_STATE = 1 << 4


#: RAM per GMAC call (small enough to share out among threads).
_DIGEST_CHUNK: Final = 64 << 20
#: Threads the chunks' tags are computed on (AES-GCM releases the GIL; the guest is
#: stopped, so its CPUs are free): 1 GiB in ~75 ms instead of ~125 ms on 2 CPUs.
_DIGEST_THREADS: Final = min(4, os.cpu_count() or 1)


def memory_digest(key: bytes, memory: npt.NDArray[np.uint8]) -> bytes:
    """The keyed digest of all RAM, page 0 first (module doc)."""
    flat = np.ascontiguousarray(memory).reshape(-1)
    gmac = AESGCM(key)

    def tag(index: int) -> bytes:
        start = index * _DIGEST_CHUNK
        nonce = b"vmmig-mem" + index.to_bytes(3, "big")
        return gmac.encrypt(nonce, b"", flat[start:start + _DIGEST_CHUNK].data)

    chunks = range(-(-len(flat) // _DIGEST_CHUNK))
    with ThreadPoolExecutor(_DIGEST_THREADS) as pool:
        return hashlib.sha256(b"".join(pool.map(tag, chunks))).digest()


def versions_digest(versions: npt.NDArray[np.uint64]) -> bytes:
    """SHA-256 of the version table as u64 LE in GPA order."""
    return hashlib.sha256(np.ascontiguousarray(versions, dtype="<u8").data).digest()


def cpu_digest(states: Mapping[int, bytes]) -> bytes:
    """SHA-256 of ``u32 index || state`` per vCPU in index order; zeros if there is none."""
    if not states:
        return bytes(32)
    digest = hashlib.sha256()
    for index in sorted(states):
        digest.update(index.to_bytes(4, "little") + states[index])
    return digest.digest()


@attrs.frozen
class Manifest:
    """What the target must hold before it may commit."""

    ram_pages: int
    records: int
    pages_exported: int
    vcpu_states: int
    versions_digest: bytes
    memory_digest: bytes
    cpu_digest: bytes

    @classmethod
    def of(
        cls,
        keys: SessionKeys,
        memory: npt.NDArray[np.uint8],
        versions: npt.NDArray[np.uint64],
        records: int,
        cpu_states: Mapping[int, bytes],
    ) -> Manifest:
        """The manifest of a side holding ``memory`` at ``versions`` and ``cpu_states``
        (exported or staged) after ``records``."""
        return cls(
            len(memory),
            records,
            int(versions.sum(dtype=np.uint64)),
            len(cpu_states),
            versions_digest(versions),
            memory_digest(keys.memory, memory),
            cpu_digest(cpu_states),
        )

    def pack(self) -> bytes:
        """The 128-byte body (fields in body order)."""
        return _BODY.pack(*attrs.astuple(self))

    @classmethod
    def unpack(cls, body: bytes) -> Manifest:
        """Parse an authenticated body."""
        return cls(*_BODY.unpack(body))

    def compare(self, held: Manifest) -> MismatchBits:
        """Which parts of ``held`` (the target's own) differ from this one."""
        bits = MismatchBits(0)
        if held.ram_pages != self.ram_pages:
            bits |= MismatchBits.RAM_SIZE
        if held.records != self.records:
            bits |= MismatchBits.RECORD_COUNT
        if (held.versions_digest, held.pages_exported) != (
            self.versions_digest,
            self.pages_exported,
        ):
            bits |= MismatchBits.VERSIONS
        if held.memory_digest != self.memory_digest:
            bits |= MismatchBits.MEMORY
        if (held.vcpu_states, held.cpu_digest) != (self.vcpu_states, self.cpu_digest):
            bits |= MismatchBits.CPU_STATE
        return bits


def seal_manifest(keys: SessionKeys, manifest: Manifest) -> bytes:
    """The source's sealed manifest record."""
    return envelope.seal_message(
        AESGCM(keys.manifest),
        kind=RecordKind.MANIFEST,
        direction=Direction.SOURCE_TO_TARGET,
        session_id=keys.session_id,
        body=manifest.pack(),
    )


def open_manifest(keys: SessionKeys, record: bytes | memoryview) -> Manifest:
    """Authenticate a manifest record; Refusal if it is not this session's."""
    body = envelope.open_message(
        AESGCM(keys.manifest),
        record,
        session_id=keys.session_id,
        kind=RecordKind.MANIFEST,
        direction=Direction.SOURCE_TO_TARGET,
        body_length=MANIFEST_BODY_SIZE,
    )
    return Manifest.unpack(body)


def _seal_control(keys: SessionKeys, kind: RecordKind, body: bytes) -> bytes:
    return envelope.seal_message(
        AESGCM(keys.control),
        kind=kind,
        direction=Direction.TARGET_TO_SOURCE,
        session_id=keys.session_id,
        body=body,
    )


def _open_control(keys: SessionKeys, kind: RecordKind, record: bytes | memoryview) -> bytes:
    return envelope.open_message(
        AESGCM(keys.control),
        record,
        session_id=keys.session_id,
        kind=kind,
        direction=Direction.TARGET_TO_SOURCE,
        body_length=_RECEIPT_SIZE,
    )


def seal_commit_receipt(keys: SessionKeys, manifest: Manifest) -> bytes:
    """Target: proof that it committed after verifying ``manifest``."""
    digest = hashlib.sha256(manifest.pack()).digest()
    return _seal_control(keys, RecordKind.COMMIT_RECEIPT, digest)


def open_commit_receipt(keys: SessionKeys, manifest: Manifest, record: bytes | memoryview
                        ) -> None:
    """Source: Refusal unless ``record`` is the target's receipt for ``manifest``."""
    body = _open_control(keys, RecordKind.COMMIT_RECEIPT, record)
    if body != hashlib.sha256(manifest.pack()).digest():
        raise Refusal(Status.AUTH_FAILED, "commit receipt for another manifest")


def seal_abort_token(keys: SessionKeys) -> bytes:
    """Target: proof that it dropped the session without committing."""
    return _seal_control(keys, RecordKind.ABORT_TOKEN, bytes(_RECEIPT_SIZE))


def open_abort_token(keys: SessionKeys, record: bytes | memoryview) -> None:
    """Source: Refusal unless ``record`` is the target's abort token of this session."""
    _open_control(keys, RecordKind.ABORT_TOKEN, record)
