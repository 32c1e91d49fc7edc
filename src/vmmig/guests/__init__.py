"""Tiny x86 test guests, built from source by the package, and their checker.

Two 512-byte boot sectors, booted by SeaBIOS from a raw IDE disk:

``ab``
    QEMU's migration-test "a-b" guest: enters 64-bit long mode (paging on,
    identity map of 0..4 GiB), prints ``A`` on COM1, then increments byte 0
    of every 4 KiB page from 1 MiB to the end of RAM below 4 GiB, page after
    page, forever, printing ``B`` every 64 passes (the emulated platform's
    ``ab64.S`` prints one a pass and checks the rule itself).  It publishes the region
    it dirties at physical 0x500 (see :mod:`vmmig.guests.ab_check`), and
    :func:`check_ab` verifies its memory after a migration.
``idle``
    Enters protected mode, prints ``A`` and halts with interrupts off:
    nothing is dirtied after boot.

:func:`build_image` assembles them with GNU binutils on first use and caches
the images by the hash of their source.
"""

from __future__ import annotations

from vmmig.guests.ab_check import (
    AB_START,
    INFO_ADDR,
    PAGE_SIZE,
    AbCheck,
    ab_passes,
    ab_region,
    check_ab,
)
from vmmig.guests.build import GuestName, build_from_source, build_image, default_cache_dir


__all__ = [
    "AB_START",
    "INFO_ADDR",
    "PAGE_SIZE",
    "AbCheck",
    "GuestName",
    "ab_passes",
    "ab_region",
    "build_from_source",
    "build_image",
    "check_ab",
    "default_cache_dir",
]
