"""Per-migration session keys: HKDF-SHA256 from the master secret and both nonces.

Every MH of one guest holds the same master secret (the guest owner injects
it at launch into each attested VM, LAUNCH_SECRET).  Used directly it would
key every migration of that guest alike; so each migration derives its own
keys from it and from two fresh 32-byte nonces, one drawn by each MH at
OPEN_SESSION::

    salt       = source_nonce || target_nonce
    session_id = SHA-256("vmmig-mh-v1 session" || source_nonce || target_nonce)
    key(label) = HKDF-SHA256(ikm = master, salt, info = "vmmig-mh-v1 " || label
                             || session_id, length = 32)

with the labels ``data s->t``, ``manifest s->t``, ``control t->s`` and
``memory`` (the manifest's keyed memory digest, computed by both MHs and
never sent in the clear).

Why this is enough:

- A record of one migration is useless in another: either nonce differs, so
  every key and the session id (bound into each record's associated data)
  differ.  An MH draws its nonce itself, so the host cannot force a repeat.
- A -> B -> C: B draws a new nonce as source; no key of A -> B returns.
- One key per purpose and direction: a page record cannot pass as a manifest
  or a receipt, and the target never seals under a source key, so two
  senders never share a (key, nonce) pair.
- The roles are fixed by position in the salt, so swapping the two nonces
  gives unrelated keys (no reflection).
"""

from __future__ import annotations

import hashlib
from typing import Final

import attrs
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vmmig.firmware.abi import NONCE_SIZE


__all__ = ["KEY_SIZE", "MIN_MASTER_SECRET", "SessionKeys", "derive_session_keys", "session_id"]

#: Bytes of each AES-256-GCM key.
KEY_SIZE: Final = 32
#: Shortest master secret accepted (128 bits of entropy).
MIN_MASTER_SECRET: Final = 16

_PREFIX: Final = b"vmmig-mh-v1 "


@attrs.frozen(repr=False)
class SessionKeys:
    """The keys of one migration session (repr hides them).

    :ivar session_id: 32 bytes bound into every record of the session.
    :ivar data: seals page (and CPU-state) records, source -> target.
    :ivar manifest: seals the final manifest, source -> target.
    :ivar control: seals the commit receipt and abort token, target -> source.
    :ivar memory: keys the memory digest both MHs compute (:func:`~.manifest.memory_digest`).
    """

    session_id: bytes
    data: bytes
    manifest: bytes
    control: bytes
    memory: bytes

    def __repr__(self) -> str:
        return f"SessionKeys(session_id={self.session_id.hex()}, <keys hidden>)"


def session_id(source_nonce: bytes, target_nonce: bytes) -> bytes:
    """The 32-byte session id of the migration these nonces open."""
    _check_nonces(source_nonce, target_nonce)
    return hashlib.sha256(_PREFIX + b"session" + source_nonce + target_nonce).digest()


def derive_session_keys(master: bytes, source_nonce: bytes, target_nonce: bytes) -> SessionKeys:
    """Derive a session's keys; ValueError on a short secret or bad nonces."""
    if len(master) < MIN_MASTER_SECRET:
        raise ValueError(f"master secret shorter than {MIN_MASTER_SECRET} bytes")
    sid = session_id(source_nonce, target_nonce)
    salt = source_nonce + target_nonce

    def key(label: bytes) -> bytes:
        hkdf = HKDF(hashes.SHA256(), KEY_SIZE, salt, _PREFIX + label + sid)
        return hkdf.derive(master)

    return SessionKeys(sid, key(b"data s->t"), key(b"manifest s->t"), key(b"control t->s"),
                       key(b"memory"))


def _check_nonces(source_nonce: bytes, target_nonce: bytes) -> None:
    if len(source_nonce) != NONCE_SIZE or len(target_nonce) != NONCE_SIZE:
        raise ValueError(f"nonces must be {NONCE_SIZE} bytes")
    if source_nonce == target_nonce:
        raise ValueError("source and target nonces are equal (a reflected nonce)")
