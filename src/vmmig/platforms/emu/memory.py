"""Guest RAM of one emulated machine, and the host's view of it.

For a ``plain`` VM the RAM is a file in a shared-memory directory, which the
host (vmmig's agents) may map, as QEMU's RAM may be.  For an SEV VM the RAM
is an anonymous memfd that never leaves the machine process: the vCPUs see
plaintext (as the memory controller decrypts for the guest), and every host
access goes through :meth:`GuestMemory.host_read_pages` and
:meth:`GuestMemory.host_write_pages`, which see and write ciphertext under
the VM's key, tweaked by address (:mod:`vmmig.platforms.emu.xex`).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from vmmig.agents.pages import PAGE, prefault, ram_pages
from vmmig.platforms.emu.xex import Xex


__all__ = ["GuestMemory"]


class GuestMemory:
    """One machine's guest-physical RAM, ``[0, size)``.

    :param size: bytes, a multiple of the page size.
    :param path: where a plain VM's RAM file lives (the host may map it);
        ignored for an encrypted VM.
    :param encryption: the SEV memory encryption of the VM, None for plain.
    """

    def __init__(self, size: int, *, path: Path | None = None,
                 encryption: Xex | None = None) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM of {size} bytes is not a whole number of pages")
        self.size = size
        self.encryption = encryption
        if encryption is None:
            if path is None:
                raise ValueError("a plain VM's RAM needs a path the host can map")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self.path: Path | None = path
        else:
            # No name in any filesystem: nothing outside this process can map it.
            fd = os.memfd_create("vmmig-private-ram", os.MFD_CLOEXEC)
            self.path = None
        try:
            os.ftruncate(fd, size)
            self.ram = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        prefault(self.ram)
        self.pages = ram_pages(self.ram, writable=True)

    @property
    def encrypted(self) -> bool:
        """True for an SEV VM's private memory."""
        return self.encryption is not None

    def host_read_pages(self, numbers: np.ndarray) -> bytes:
        """The pages as the hypervisor reads them: ciphertext when encrypted."""
        plain = np.take(self.pages, numbers, axis=0).tobytes()
        if self.encryption is None:
            return plain
        return self.encryption.encrypt_pages(plain, numbers * PAGE)

    def host_write_pages(self, numbers: np.ndarray, data: bytes) -> None:
        """Write pages as the hypervisor does: the memory controller decrypts them.

        On an encrypted VM the guest then reads ``data`` decrypted under its
        key at these addresses: garbage unless ``data`` is this VM's own
        ciphertext of these very addresses.
        """
        if self.encryption is not None:
            data = self.encryption.decrypt_pages(data, numbers * PAGE)
        self.pages[numbers] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)

    def close(self) -> None:
        """Unmap the RAM (and remove a plain VM's RAM file)."""
        del self.pages
        self.ram.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
