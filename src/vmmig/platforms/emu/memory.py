"""Guest RAM of one emulated machine, and the host's view of it.

For a ``plain`` VM the RAM is a file in a shared-memory directory, which the
host (vmmig's agents) may map, as QEMU's RAM may be.  For an SEV VM the RAM
is an anonymous memfd that never leaves the machine process: the vCPUs see
plaintext (as the memory controller decrypts for the guest), and every host
access goes through :meth:`GuestMemory.host_read_pages` and
:meth:`GuestMemory.host_write_pages`, which see and write ciphertext under
the VM's key, tweaked by address (:mod:`vmmig.platforms.emu.xex`).

An SEV VM's RAM is private from the start, but its key arrives later: the
PSP's ACTIVATE loads it into the memory controller's key slot, which
:meth:`GuestMemory.load_key` models (the :class:`~.psp.MemoryKeySlot`
protocol).  Until then the host can neither read nor write the RAM.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from vmmig.agents.pages import PAGE, prefault, ram_pages
from vmmig.errors import PlatformError
from vmmig.platforms.emu.xex import BLOCK, Xex


__all__ = ["GuestMemory"]


class GuestMemory:
    """One machine's guest-physical RAM, ``[0, size)``.

    :param size: bytes, a multiple of the page size.
    :param path: where a plain VM's RAM file lives (the host may map it);
        ignored for an encrypted VM.
    :param encryption: the SEV memory encryption of the VM, None for plain.
    :param private: an SEV VM's RAM whose key :meth:`load_key` supplies
        later (implied by ``encryption``).
    """

    def __init__(self, size: int, *, path: Path | None = None,
                 encryption: Xex | None = None, private: bool = False) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM of {size} bytes is not a whole number of pages")
        self.size = size
        self.encryption = encryption
        self._private = private or encryption is not None
        if not self._private:
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
        return self._private

    def load_key(self, vek: bytes) -> None:
        """Encrypt the private RAM under ``vek`` from now on (the PSP's ACTIVATE).

        The key lives on only inside the :class:`Xex` object.
        """
        if not self._private:
            raise ValueError("a plain VM's RAM takes no key")
        self.encryption = Xex(vek)

    def _key(self) -> Xex | None:
        if self._private and self.encryption is None:
            raise PlatformError("private guest RAM has no key yet (no ACTIVATE)")
        return self.encryption

    def host_read_pages(self, numbers: np.ndarray) -> bytes:
        """The pages as the hypervisor reads them: ciphertext when encrypted."""
        plain = np.take(self.pages, numbers, axis=0).tobytes()
        key = self._key()
        if key is None:
            return plain
        return key.encrypt_pages(plain, numbers * PAGE)

    def host_read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa`` as the hypervisor reads them (any alignment)."""
        first, numbers = self._pages_of(gpa, size)
        offset = gpa - first
        return self.host_read_pages(numbers)[offset:offset + size]

    def host_write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at ``gpa`` as the hypervisor does (any alignment).

        On private RAM the bytes are taken for ciphertext, as the memory
        controller decrypts a whole 16-byte block at a time: the guest sees
        every block ``data`` touches turn to garbage and no other byte change.
        """
        if not data:
            return
        key = self._key()
        if key is None:
            self._pages_of(gpa, len(data))
            self.ram[gpa:gpa + len(data)] = data
            return
        low, high = gpa - gpa % BLOCK, -(-(gpa + len(data)) // BLOCK) * BLOCK
        first, numbers = self._pages_of(low, high - low)
        ciphertext = bytearray(self.host_read_pages(numbers))
        ciphertext[gpa - first:gpa - first + len(data)] = data
        plain = key.decrypt_pages(bytes(ciphertext), numbers * PAGE)
        self.ram[low:high] = plain[low - first:high - first]

    def _pages_of(self, gpa: int, size: int) -> tuple[int, np.ndarray]:
        """The first page's address and the numbers of the pages [gpa, gpa + size) covers."""
        if size <= 0 or gpa < 0 or gpa + size > self.size:
            raise ValueError(f"[{gpa:#x}, {gpa + size:#x}) is not inside guest RAM "
                             f"of {self.size:#x} bytes")
        numbers = np.arange(gpa // PAGE, (gpa + size - 1) // PAGE + 1, dtype=np.uint64)
        return gpa - gpa % PAGE, numbers

    def host_write_pages(self, numbers: np.ndarray, data: bytes) -> None:
        """Write pages as the hypervisor does: the memory controller decrypts them.

        On an encrypted VM the guest then reads ``data`` decrypted under its
        key at these addresses: garbage unless ``data`` is this VM's own
        ciphertext of these very addresses.
        """
        key = self._key()
        if key is not None:
            data = key.decrypt_pages(data, numbers * PAGE)
        self.pages[numbers] = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)

    def close(self) -> None:
        """Unmap the RAM (and remove a plain VM's RAM file)."""
        del self.pages
        self.ram.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
