"""Give part of an existing mapping another file's pages, in place (``mmap`` with ``MAP_FIXED``).

Python's :mod:`mmap` cannot map at a chosen address.  The emulated platform
needs that to change which file backs a range of guest RAM (private memfd or
the host-visible shared segment) while vCPUs keep running over the RAM
mapping: Unicorn holds the mapping's address, and one ``MAP_FIXED`` ``mmap``
swaps the range's pages under the kernel's mmap lock, so no thread ever
finds the range unmapped and every pointer into it stays valid.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Final


__all__ = ["map_file_at"]

_MAP_FIXED: Final = 0x10
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)


def map_file_at(address: int, length: int, fd: int, offset: int) -> None:
    """Map ``fd``'s bytes ``[offset, offset + length)`` shared and writable at ``address``.

    Whatever was mapped there is replaced, atomically for other threads.

    :param address: a page-aligned address inside a mapping this process owns.
    :param length: bytes, a multiple of the page size.
    :param fd: the file to map; it must be at least ``offset + length`` long.
    :param offset: page-aligned offset in the file.
    :raises OSError: the kernel refused.
    """
    got = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if got in (None, _MAP_FAILED):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap(MAP_FIXED) at {address:#x}: {os.strerror(errno)}")
