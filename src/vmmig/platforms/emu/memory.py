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

Shared pages.  An SEV guest shares pages with the hypervisor (the MH's
mailbox and transfer buffers) by asking for them with KVM_HC_MAP_GPA_RANGE
(:mod:`.shared_pages`).  Given ``shared_path``, private RAM has a shared
segment: a file of the RAM's size (sparse; ``<run_dir>/<name>.shared``)
that the host may map.  A shared page is backed by that file at the page's
own offset, in the RAM mapping itself (:func:`.fixed_mapping.map_file_at`),
so the vCPUs and the host see the same plaintext there; host reads and
writes of a shared page through this class are plaintext too.

A conversion does not keep a page's content, as on hardware (the guest
re-initialises a page it converted): it discards the old backing's
content (``MADV_REMOVE``) before mapping the new one.  Private -> shared
frees the private plaintext, and the guest then sees the shared file's
bytes, zeros unless the host wrote there meanwhile; shared -> private
zeroes the file's range, so the host keeps no copy, and the guest sees a
zero page.  Code must not live in a page it converts: Unicorn keeps code it
translated.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from vmmig.agents.pages import PAGE, prefault, ram_pages
from vmmig.errors import PlatformError
from vmmig.platforms.emu.fixed_mapping import map_file_at
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
    :param shared_path: where private RAM's shared segment lives (the host
        may map it); None for no shared pages.
    :raises ValueError: a size that is not whole pages, or a shared segment
        for plain RAM (all of which the host sees already).
    """

    def __init__(self, size: int, *, path: Path | None = None,
                 encryption: Xex | None = None, private: bool = False,
                 shared_path: Path | None = None) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM of {size} bytes is not a whole number of pages")
        self.size = size
        self.encryption = encryption
        self._private = private or encryption is not None
        if shared_path is not None and not self._private:
            raise ValueError("a plain VM's RAM is all host-visible: it has no shared segment")
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
        except BaseException:
            os.close(fd)
            raise
        # Kept to map private pages back after they were shared.
        self._ram_fd = fd
        prefault(self.ram)
        self.pages = ram_pages(self.ram, writable=True)
        anchor = ctypes.c_char.from_buffer(self.ram)
        self._address = ctypes.addressof(anchor)
        del anchor  # an export would keep the mapping from closing
        #: Which pages are shared (backed by the shared segment), by page number.
        self._shared = np.zeros(size // PAGE, dtype=np.bool_)
        # Held while pages change backing, and by host accesses (bitmap and content agree).
        self._lock = threading.Lock()
        self.shared_path = shared_path
        self._shared_fd = -1
        if shared_path is not None:
            try:
                self._shared_fd = os.open(shared_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC
                                          | os.O_CLOEXEC, 0o600)
                os.ftruncate(self._shared_fd, size)
            except BaseException:
                self.close()
                raise

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

    # -- shared pages --------------------------------------------------------------

    def is_shared(self, number: int) -> bool:
        """Whether page ``number`` is shared (host-visible plaintext)."""
        return bool(self._shared[number])

    def shared_runs(self) -> list[tuple[int, int]]:
        """The shared pages as runs (first page number, page count), in address order."""
        return _runs(self._shared)

    def runs_to_convert(self, first: int, count: int, shared: bool) -> list[tuple[int, int]]:
        """The runs of pages in ``[first, first + count)`` not yet ``shared`` (or private)."""
        runs = _runs(self._shared[first:first + count] != shared)
        return [(first + start, length) for start, length in runs]

    def convert(self, first: int, count: int, shared: bool) -> None:
        """Back pages ``[first, first + count)`` by the shared segment, or by private RAM again.

        The pages' content is discarded (module doc).  Running vCPUs see the
        new backing from their next access on: the RAM mapping's address
        does not change.

        :raises ValueError: no shared segment, or pages outside RAM.
        :raises OSError: the kernel refused to map.
        """
        if self._shared_fd < 0:
            raise ValueError("this RAM has no shared segment")
        if count <= 0 or first < 0 or first + count > len(self._shared):
            raise ValueError(f"pages [{first}, {first + count}) are not inside guest RAM")
        offset, length = first * PAGE, count * PAGE
        with self._lock:
            self.ram.madvise(mmap.MADV_REMOVE, offset, length)
            map_file_at(self._address + offset, length,
                        self._shared_fd if shared else self._ram_fd, offset)
            self._shared[first:first + count] = shared

    # -- the hypervisor's view ------------------------------------------------------

    def host_read_pages(self, numbers: np.ndarray) -> bytes:
        """The pages as the hypervisor reads them: ciphertext when encrypted, unless shared."""
        with self._lock:
            pages = np.take(self.pages, numbers, axis=0)
            private = ~self._shared[numbers]
        if not private.any():
            return pages.tobytes()
        key = self._key()
        if key is None:
            return pages.tobytes()
        if private.all():
            return key.encrypt_pages(pages.tobytes(), numbers * PAGE)
        sealed = key.encrypt_pages(pages[private].tobytes(), numbers[private] * PAGE)
        pages[private] = np.frombuffer(sealed, dtype=np.uint8).reshape(-1, PAGE)
        return pages.tobytes()

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
        Shared pages take the bytes as they are.
        """
        if not data:
            return
        _, numbers = self._pages_of(gpa, len(data))
        with self._lock:
            shared = self._shared[numbers]
            if shared.all() or not shared.any():
                self._write_uniform(gpa, data, shared=bool(shared[0]))
                return
            for number, page_shared in zip(numbers.tolist(), shared.tolist(), strict=True):
                low, high = max(gpa, number * PAGE), min(gpa + len(data), (number + 1) * PAGE)
                self._write_uniform(low, data[low - gpa:high - gpa], shared=page_shared)

    def _write_uniform(self, gpa: int, data: bytes, *, shared: bool) -> None:
        """:meth:`host_write` to pages that are all shared or all private; lock held."""
        key = None if shared else self._key()
        if key is None:
            self.ram[gpa:gpa + len(data)] = data
            return
        low, high = gpa - gpa % BLOCK, -(-(gpa + len(data)) // BLOCK) * BLOCK
        first, numbers = self._pages_of(low, high - low)
        plain = np.take(self.pages, numbers, axis=0).tobytes()
        ciphertext = bytearray(key.encrypt_pages(plain, numbers * PAGE))
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
        ciphertext of these very addresses.  Shared pages take ``data`` as it is.
        """
        pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
        with self._lock:
            private = ~self._shared[numbers]
            key = self._key() if private.any() else None
            if key is not None and private.all():
                pages = np.frombuffer(key.decrypt_pages(data, numbers * PAGE),
                                      dtype=np.uint8).reshape(-1, PAGE)
            elif key is not None:
                pages = pages.copy()
                opened = key.decrypt_pages(pages[private].tobytes(), numbers[private] * PAGE)
                pages[private] = np.frombuffer(opened, dtype=np.uint8).reshape(-1, PAGE)
            self.pages[numbers] = pages

    def close(self) -> None:
        """Unmap the RAM (and remove a plain VM's RAM file and the shared segment)."""
        if hasattr(self, "pages"):
            del self.pages
            self.ram.close()
            os.close(self._ram_fd)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        if self._shared_fd >= 0:
            os.close(self._shared_fd)
            self._shared_fd = -1
        if self.shared_path is not None:
            self.shared_path.unlink(missing_ok=True)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in ``mask`` as (start, length), in order."""
    edges = np.flatnonzero(np.diff(mask.astype(np.int8), prepend=0, append=0))
    return [(int(start), int(end - start)) for start, end in
            zip(edges[0::2], edges[1::2], strict=True)]
