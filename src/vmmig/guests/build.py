"""Assemble the test guests into bootable disk images, cached by source hash.

Each guest is one boot sector: GNU ``as`` assembles it and ``ld`` links it
at 0x7c00, where the BIOS loads it, straight to a flat binary.  The image
is that one 512-byte sector, which SeaBIOS boots from an IDE disk.

The emulated platform's programs (:mod:`vmmig.guests.emu`) use the same
cache to build flat 64-bit binaries instead (``flat64_base``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Literal

from vmmig.errors import HostRequirementError, PlatformError


__all__ = ["GuestName", "build_from_source", "build_image", "default_cache_dir", "guest_source"]

#: The guests this package ships.
GuestName = Literal["ab", "fill", "idle"]
#: Guests built from another's source with ``as --defsym`` symbols: (source, symbols).
_VARIANTS: dict[str, tuple[str, dict[str, int]]] = {"fill": ("ab", {"PASSES": 1})}

SECTOR_SIZE = 512
BOOT_SIGNATURE = b"\x55\xaa"


def default_cache_dir() -> Path:
    """Where built images are kept unless the caller says otherwise.

    :returns: ``$XDG_CACHE_HOME/vmmig/guests``, or ``~/.cache/vmmig/guests``.
    """
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vmmig" / "guests"


def guest_source(name: GuestName) -> bytes:
    """The assembly source of a shipped guest.

    :param name: which guest.
    :returns: the contents of ``vmmig/guests/<name>.S`` (a variant's: its source's).
    """
    source = _VARIANTS[name][0] if name in _VARIANTS else name
    return resources.files("vmmig.guests").joinpath(f"{source}.S").read_bytes()


def build_image(name: GuestName, cache_dir: Path | None = None) -> Path:
    """Build a shipped guest's boot disk, or find it already built.

    QEMU locks a disk it writes to, so give each VM its own copy.

    :param name: which guest.
    :param cache_dir: where images are kept; :func:`default_cache_dir` if None.
    :returns: the path of the raw disk image.
    :raises HostRequirementError: GNU as or ld is not installed.
    :raises PlatformError: the source does not assemble into a boot sector.
    """
    defines = _VARIANTS[name][1] if name in _VARIANTS else {}
    return build_from_source(guest_source(name), stem=name, cache_dir=cache_dir,
                             defines=defines)


def build_from_source(
    source: bytes, *, stem: str, cache_dir: Path | None = None, flat64_base: int | None = None,
    defines: Mapping[str, int] | None = None,
) -> Path:
    """Build a boot disk from assembly source, or find it already built.

    The image is named after ``stem`` and the SHA-256 of ``source``, so a
    changed source gets a new image and never a stale one.

    :param source: GNU as source of a 512-byte boot sector (or of a flat 64-bit program).
    :param stem: the first part of the image's file name.
    :param cache_dir: where images are kept; :func:`default_cache_dir` if None.
    :param flat64_base: None for a boot sector; otherwise build a flat 64-bit
        binary linked at this address (any size), named ``.bin`` in the cache.
    :param defines: symbols for ``as --defsym``; they are part of the cache key.
    :returns: the path of the raw disk image.
    :raises HostRequirementError: GNU as or ld is not installed.
    :raises PlatformError: the source does not assemble into a boot sector.
    """
    cache = default_cache_dir() if cache_dir is None else cache_dir
    symbols = [f"{name}={value}" for name, value in sorted((defines or {}).items())]
    digest = hashlib.sha256(source + repr(symbols).encode()).hexdigest()[:16]
    # A flat binary's name carries its link address: linked elsewhere, it differs.
    flat = f"{stem}-{flat64_base:x}-{digest}.bin" if flat64_base is not None else ""
    image = cache / (flat or f"{stem}-{digest}.img")
    if image.is_file():
        return image
    sector = _assemble(source, stem, flat64_base, symbols)
    cache.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent build or reader never sees half an image.
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{stem}-", suffix=image.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(sector)
        Path(tmp).replace(image)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return image


def _assemble(source: bytes, stem: str, flat64_base: int | None,
              symbols: list[str]) -> bytes:
    """Assemble and link one boot sector (or flat 64-bit binary) and check its shape."""
    assembler = shutil.which("as")
    if assembler is None:
        raise HostRequirementError("GNU as (package binutils) is needed to build the test guest")
    linker = shutil.which("ld")
    if linker is None:
        raise HostRequirementError("GNU ld (package binutils) is needed to build the test guest")
    if flat64_base is None:
        bits, emulation, base = "--32", "elf_i386", 0x7C00
    else:
        bits, emulation, base = "--64", "elf_x86_64", flat64_base
    with tempfile.TemporaryDirectory(prefix="vmmig-guest-") as work:
        src, obj, out = (Path(work) / f"{stem}{ext}" for ext in (".S", ".o", ".bin"))
        src.write_bytes(source)
        defsyms = [arg for symbol in symbols for arg in ("--defsym", symbol)]
        _run([assembler, bits, *defsyms, "-o", str(obj), str(src)], stem)
        # -z noexecstack: the object has no .note.GNU-stack and ld would warn.
        link = ["-m", emulation, "-z", "noexecstack", "-Ttext", hex(base), "--oformat", "binary"]
        _run([linker, *link, "-o", str(out), str(obj)], stem)
        sector = out.read_bytes()
    if flat64_base is not None:
        return sector
    if len(sector) != SECTOR_SIZE or not sector.endswith(BOOT_SIGNATURE):
        raise PlatformError(
            f"guest {stem}: expected a {SECTOR_SIZE}-byte boot sector ending 55 aa, "
            f"got {len(sector)} bytes ending {sector[-2:].hex(' ')}"
        )
    return sector


def _run(argv: list[str], stem: str) -> None:
    """Run one build tool, turning its failure into a PlatformError with its output."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tool = Path(argv[0]).name
        raise PlatformError(f"guest {stem}: {tool} failed: {result.stderr.strip()}")
