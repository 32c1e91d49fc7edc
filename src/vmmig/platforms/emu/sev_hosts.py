"""The emulated SEV deployment of one run: an AMD root and two hosts, source and target.

Each host is a directory holding its PSP's identity (platform keys and the
certificate chain the root endorsed), which ``vmmig emu start --host-dir``
loads; a run makes two new ones.  The root's directory plays AMD's key
server; like AMD's, the root outlives the runs (a guest owner pins it), so
it is kept in the user's cache directory and made on first use (two
RSA-4096 keys: seconds), in a worker thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from vmmig.platforms.emu.psp import EmulatedAmdRoot, PlatformChain
from vmmig.platforms.emu.sev_launch import host_psp


__all__ = ["EmulatedHosts", "default_amd_root"]


def default_amd_root() -> Path:
    """Where the emulated AMD root lives: ``$XDG_CACHE_HOME/vmmig/emulated-amd-root``."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "vmmig" / "emulated-amd-root"


@attrs.frozen
class EmulatedHosts:
    """Where the run's emulated AMD root and hosts keep their state.

    :ivar root: the emulated AMD root's directory.
    :ivar source: the source host's directory (its name is the host's).
    :ivar target: the target host's directory.
    """

    root: Path
    source: Path
    target: Path

    @classmethod
    def create(cls, directory: Path, root: Path) -> EmulatedHosts:
        """Two new hosts under ``directory``, endorsed by the root in ``root`` (made if
        missing); blocking."""
        hosts = cls(root, directory / "host-a", directory / "host-b")
        for host in (hosts.source, hosts.target):
            host_psp(host, hosts.root)
        return hosts

    def amd_certs(self) -> tuple[bytes, bytes]:
        """The root's ASK and ARK certificates, as a guest owner pins them."""
        root = EmulatedAmdRoot.load_or_create(self.root)
        return root.ask_cert, root.ark_cert

    def chain(self, host: Path) -> PlatformChain:
        """A host's certificate chain, as ``sevctl export`` gives it to the owner."""
        return host_psp(host, self.root).chain
