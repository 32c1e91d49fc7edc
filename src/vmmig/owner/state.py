"""The owner's state directory: trust anchor, expected launches, master secrets.

Layout (the directory is made mode 0700, every file 0600, written atomically
by :mod:`vmmig.platforms.emu.psp.store`)::

    DIR/trust.json            {"ask": b64, "ark": b64}: the AMD certificates pinned
    DIR/guests/<guest>.json   the guest's boot ExpectedLaunch (see :mod:`.expected`)
    DIR/targets/<guest>.json  its migration-target ExpectedLaunch, if it migrates
    DIR/secrets/<guest>.json  {"secret": b64}: the guest's master secret
    DIR/audit.jsonl           the decision log (see :mod:`.audit`)

Each kind of expectation has its own directory, so that no guest id can
name another's file.  The master secret is made on first use (32 random
bytes) under a lock, so two owner processes sharing the directory never
hand out two different secrets for one guest: source and target of a
migration must get the same.
Launch sessions are not kept here: they live in the owner's memory only, so
a restarted owner forgets its pending sessions (their launches must start
over) and can never be made to reuse one.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Final

from vmmig.errors import ConfigError, PlatformError
from vmmig.owner.expected import ExpectedLaunch, LaunchKind
from vmmig.platforms.emu.psp.amd_cert import AmdCert
from vmmig.platforms.emu.psp.sev_cert import Usage
from vmmig.platforms.emu.psp.store import b64, locked, read_state, unb64, write_state


__all__ = ["GUEST_ID", "MASTER_SECRET_SIZE", "OwnerState", "TrustAnchor"]

#: A guest id: it names files, so no slashes or leading dots; at most 64 characters.
GUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Bytes of a new master secret.
MASTER_SECRET_SIZE: Final = 32
#: The directory of each kind of expected launch.
_EXPECTATIONS: Final = {LaunchKind.BOOT: "guests", LaunchKind.MIGRATION_TARGET: "targets"}


class TrustAnchor:
    """The AMD certificates the owner trusts: ARK (the root) and the ASK it signed.

    :raises ConfigError: a certificate is malformed or has the wrong role.
    """

    def __init__(self, ask: bytes, ark: bytes) -> None:
        self.ask = ask
        self.ark = ark
        try:
            ark_cert, _ = AmdCert.parse_prefix(ark)
            ask_cert, _ = AmdCert.parse_prefix(ask)
        except ValueError as err:
            raise ConfigError("amd-root", f"not an AMD certificate: {err}") from None
        if (ark_cert.usage, ask_cert.usage) != (Usage.ARK, Usage.ASK):
            raise ConfigError("amd-root", "expected an ASK and an ARK certificate")
        #: The trusted ARK's public key.
        self.ark_public_key = ark_cert.public_key

    @property
    def amd_certs(self) -> bytes:
        """ASK || ARK, as SEND_START's AMD_CERT and as a platform chain completes."""
        return self.ask + self.ark


def check_guest_id(guest: str) -> str:
    """``guest`` if it is a valid id, else :class:`ConfigError`."""
    if not GUEST_ID.fullmatch(guest):
        raise ConfigError("guest", f"{guest!r} is not a guest id ({GUEST_ID.pattern})")
    return guest


class OwnerState:
    """One owner's directory (layout in the module docstring).

    :param trust: the AMD certificates to pin when the directory has none
        yet; if it has some, they must be the same.
    :raises ConfigError: no trust anchor given or stored, or another one stored.
    """

    def __init__(self, directory: Path, trust: TrustAnchor | None = None) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        for sub in (*_EXPECTATIONS.values(), "secrets"):
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
        self.trust = self._pin(trust)

    def _pin(self, trust: TrustAnchor | None) -> TrustAnchor:
        path = self.directory / "trust.json"
        with locked(self.directory, "trust"):
            stored = read_state(path)
            if stored is None:
                if trust is None:
                    raise ConfigError("amd-root", f"{self.directory} trusts no AMD root yet: "
                                      "give the AMD certificates to pin")
                write_state(path, {"ask": b64(trust.ask), "ark": b64(trust.ark)})
                return trust
        pinned = TrustAnchor(unb64(stored["ask"]), unb64(stored["ark"]))
        if trust is not None and trust.amd_certs != pinned.amd_certs:
            raise ConfigError("amd-root", f"{self.directory} already trusts another AMD root; "
                              "an owner never re-pins its root")
        return pinned

    def _expectation(self, guest: str, kind: LaunchKind) -> Path:
        return self.directory / _EXPECTATIONS[kind] / f"{check_guest_id(guest)}.json"

    def expect(self, guest: str, launch: ExpectedLaunch) -> None:
        """Record (or replace) ``guest``'s expected launch of ``launch.kind``."""
        write_state(self._expectation(guest, launch.kind), launch.to_json())

    def expected(self, guest: str, kind: LaunchKind = LaunchKind.BOOT) -> ExpectedLaunch | None:
        """``guest``'s expected launch of ``kind``, None if none is recorded.

        :raises PlatformError: the stored file is corrupt, or of another kind.
        """
        path = self._expectation(guest, kind)
        data = read_state(path)
        if data is None:
            return None
        try:
            launch = ExpectedLaunch.from_json(data)
        except ValueError as err:
            raise PlatformError(f"{path}: {err}") from None
        if launch.kind is not kind:
            raise PlatformError(f"{path}: a {launch.kind} launch where a {kind} one belongs")
        return launch

    def master_secret(self, guest: str) -> bytes:
        """``guest``'s master secret, made (and kept) on first use."""
        name = f"{check_guest_id(guest)}.json"
        path = self.directory / "secrets" / name
        with locked(self.directory / "secrets", name):
            stored = read_state(path)
            if stored is None:
                secret = secrets.token_bytes(MASTER_SECRET_SIZE)
                write_state(path, {"secret": b64(secret)})
                return secret
        return unb64(stored["secret"])
