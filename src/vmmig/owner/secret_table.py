"""The injected secret's format: OVMF's SEV secret table, with one entry of ours.

OVMF reserves a secret area for LAUNCH_SECRET and reads it as a GUIDed table
(James Bottomley's ``sevsecret``, OVMF ``SecretDxe``); the same format here
lets a real OVMF-based Migration Handler read what this owner injects::

    offset  size  field
    0x00    16    table GUID 1e74f542-71dd-4d66-963e-ef4287ff173b (little-endian UUID)
    0x10    4     LE32 length of the whole table, header included
    0x14          entries, each: GUID (16), LE32 length (GUID + length + data), data
    ...           zero padding to a multiple of 16 bytes

The migration master secret is the entry :data:`MIGRATION_SECRET_GUID`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from typing import Final


__all__ = ["MIGRATION_SECRET_GUID", "SECRET_TABLE_GUID", "build_secret_table",
           "parse_secret_table"]

#: The GUID that opens OVMF's secret table.
SECRET_TABLE_GUID: Final = uuid.UUID("1e74f542-71dd-4d66-963e-ef4287ff173b")
#: vmmig's entry: the guest's migration master secret.
MIGRATION_SECRET_GUID: Final = uuid.UUID("282773fa-7e7b-402d-9ef9-9874657f18d5")
_HEADER: Final = struct.Struct("<16sI")


def build_secret_table(entries: Mapping[uuid.UUID, bytes]) -> bytes:
    """The table holding ``entries`` (layout in the module docstring)."""
    body = b"".join(_HEADER.pack(guid.bytes_le, _HEADER.size + len(data)) + data
                    for guid, data in entries.items())
    table = _HEADER.pack(SECRET_TABLE_GUID.bytes_le, _HEADER.size + len(body)) + body
    return table + bytes(-len(table) % 16)


def parse_secret_table(data: bytes) -> dict[uuid.UUID, bytes]:
    """The entries of a table, as the guest's firmware reads its secret area.

    :raises ValueError: no table GUID, or a length that leaves the table.
    """
    if len(data) < _HEADER.size:
        raise ValueError("too short for a secret table")
    guid, length = _HEADER.unpack_from(data)
    if uuid.UUID(bytes_le=guid) != SECRET_TABLE_GUID:
        raise ValueError("no secret table GUID")
    if not _HEADER.size <= length <= len(data):
        raise ValueError(f"table length {length} outside [{_HEADER.size}, {len(data)}]")
    entries: dict[uuid.UUID, bytes] = {}
    offset = _HEADER.size
    while offset < length:
        if offset + _HEADER.size > length:
            raise ValueError(f"entry header at {offset} leaves the table")
        guid, size = _HEADER.unpack_from(data, offset)
        if not _HEADER.size <= size <= length - offset:
            raise ValueError(f"entry length {size} at {offset} leaves the table")
        entries[uuid.UUID(bytes_le=guid)] = data[offset + _HEADER.size:offset + size]
        offset += size
    return entries
