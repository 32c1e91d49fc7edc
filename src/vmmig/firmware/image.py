"""The Migration Handler's firmware image and its launch configuration, as measured at launch.

On a real host the MH is code in the OVMF build the tenant hands out, and
the launch measurement covers it.  The emulated MH is this Python package,
so its "build" is a deterministic blob of the package's own sources: any
change to the MH changes the blob, hence the launch digest, and the guest
owner refuses the secret to a guest whose MH is not the one it expects::

    0    8    magic "VMMIGFW1"
    8    4    u32 format version (1)
    12   4    u32 file count
    16   8    u64 total length of the blob
    24        per file, sorted by name: u16 name length, u32 data length,
              the name (UTF-8), the file's bytes

The launch configuration is one measured block beside the blob, the
launch-time facts the MH trusts because the owner checked them: which
roles it may take (a running guest's MH must never become a target),
its queue count and where its mailbox lives::

    0    8    magic "VMMHCFG1"
    8    4    u32 roles: bit 0 source, bit 1 target
    12   4    u32 queue count
    16   8    u64 mailbox GPA (the reservation's start)
    24   8    u64 reservation size (to the end of RAM)
    32   8    u64 firmware blob length
    40   24   reserved, zero

Both live inside the measured first MiB, between the guest program (and
its stack) and OVMF's secret area at 0xF0000.
"""

from __future__ import annotations

import functools
import struct
from importlib import resources
from typing import Final

import attrs

from vmmig.firmware.abi import Role


__all__ = ["FIRMWARE_END", "FIRMWARE_GPA", "MH_CONFIG_GPA", "MH_CONFIG_SIZE", "MhLaunchConfig",
           "builtin_image", "image_files"]

#: Where the firmware blob is loaded: clear of the program (0x10000) and its growth.
FIRMWARE_GPA: Final = 0x20000
#: The blob must end here: the secret area (OVMF's SEV secret table) starts at 0xF0000.
FIRMWARE_END: Final = 0xF0000
#: The launch configuration block: the page below the blob.
MH_CONFIG_GPA: Final = 0x1F000

_MAGIC: Final = b"VMMIGFW1"
_HEADER = struct.Struct("<8sIIQ")
_FILE = struct.Struct("<HI")
_CONFIG_MAGIC: Final = b"VMMHCFG1"
_CONFIG = struct.Struct("<8sIIQQQ24x")
_ROLE_BITS: Final = {Role.SOURCE: 1, Role.TARGET: 2}
#: Bytes of the launch configuration block.
MH_CONFIG_SIZE: Final = _CONFIG.size


def image_files() -> list[tuple[str, bytes]]:
    """The MH's sources, ``(name, bytes)`` sorted by name: the ``vmmig/firmware/*.py`` files."""
    package = resources.files("vmmig.firmware")
    files = [(entry.name, entry.read_bytes()) for entry in package.iterdir()
             if entry.is_file() and entry.name.endswith(".py")]
    return sorted(files)


@functools.cache
def builtin_image() -> bytes:
    """The built-in MH firmware blob (layout in the module doc)."""
    parts = [_FILE.pack(len(name.encode()), len(data)) + name.encode() + data
             for name, data in image_files()]
    body = b"".join(parts)
    header = _HEADER.pack(_MAGIC, 1, len(parts), _HEADER.size + len(body))
    return header + body


@attrs.frozen
class MhLaunchConfig:
    """The measured launch-time facts of one guest's MH (layout in the module doc)."""

    roles: frozenset[Role]
    queue_count: int
    mailbox_gpa: int
    reserved_size: int
    image_size: int

    def pack(self) -> bytes:
        """The block's bytes."""
        bits = sum(_ROLE_BITS[role] for role in self.roles)
        return _CONFIG.pack(_CONFIG_MAGIC, bits, self.queue_count, self.mailbox_gpa,
                            self.reserved_size, self.image_size)

    @classmethod
    def unpack(cls, data: bytes) -> MhLaunchConfig:
        """Read a block back; ValueError if there is none (no MH was launched)."""
        magic, bits, queues, gpa, size, image = _CONFIG.unpack_from(data)
        if magic != _CONFIG_MAGIC:
            raise ValueError("no Migration Handler launch configuration")
        roles = frozenset(role for role, bit in _ROLE_BITS.items() if bits & bit)
        return cls(roles, queues, gpa, size, image)
