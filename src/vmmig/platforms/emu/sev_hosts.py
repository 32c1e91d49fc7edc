"""The emulated SEV deployment of one run: an AMD root and two hosts, source and target.

Each host is a directory holding its PSP's identity (platform keys and the
certificate chain the root endorsed), which ``vmmig emu start --host-dir``
loads; the root's directory plays AMD's key server.  Creating them costs a
few RSA-4096 key generations, so a run does it once, before any machine
starts, in a worker thread.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from vmmig.platforms.emu.psp import EmulatedAmdRoot, PlatformChain
from vmmig.platforms.emu.sev_launch import host_psp


__all__ = ["EmulatedHosts"]


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
    def create(cls, directory: Path) -> EmulatedHosts:
        """A new root and two hosts it endorses, under ``directory`` (blocking: key generation)."""
        hosts = cls(directory / "amd-root", directory / "host-a", directory / "host-b")
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
