"""Persisting PSP and AMD-root state: one JSON file per state directory.

Several machine processes of one host may start at once and all call
``load_or_create`` on the same directory, so creation happens under an
exclusive ``flock`` on ``<dir>/<name>.lock`` and the file is written to a
temporary name and renamed into place: a reader sees no file or a whole one.
Files hold private keys and are created mode 0600.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vmmig.errors import PlatformError


__all__ = [
    "b64",
    "ec_key_from_pem",
    "locked",
    "private_key_to_pem",
    "read_state",
    "rsa_key_from_pem",
    "unb64",
    "write_state",
]


@contextlib.contextmanager
def locked(state_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``state_dir/name.lock`` (created with the directory)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_state(path: Path) -> dict[str, Any] | None:
    """The JSON object stored at ``path``, or None if there is none.

    :raises PlatformError: if the file exists but is not a JSON object.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlatformError(f"{path}: corrupt state file: {err}") from None
    if not isinstance(state, dict):
        raise PlatformError(f"{path}: corrupt state file: not a JSON object")
    return state


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(state, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)


def b64(data: bytes) -> str:
    """Base64 text for a JSON field."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """The bytes of a base64 JSON field."""
    return base64.b64decode(text, validate=True)


def private_key_to_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> str:
    """Unencrypted PKCS#8 PEM (the file itself is mode 0600)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def ec_key_from_pem(text: str) -> ec.EllipticCurvePrivateKey:
    """Load an EC key written by :func:`private_key_to_pem`.

    :raises PlatformError: if the PEM holds another kind of key.
    """
    key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PlatformError(f"expected an EC private key, found {type(key).__name__}")
    return key


def rsa_key_from_pem(text: str) -> rsa.RSAPrivateKey:
    """Load an RSA key written by :func:`private_key_to_pem`.

    :raises PlatformError: if the PEM holds another kind of key.
    """
    # Our own key from our own 0600 state: validating it would cost ~0.5 s per 4096-bit key.
    key = serialization.load_pem_private_key(text.encode("ascii"), password=None,
                                             unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise PlatformError(f"expected an RSA private key, found {type(key).__name__}")
    return key
