"""x86-64 guest programs for the emulated platform, built from source, and their loader.

Three programs, GNU as sources beside this module, assembled on first use
and cached like the boot-sector guests (:mod:`vmmig.guests.build`):

``ab64``
    The a-b incrementer (``ab.S`` without the boot): byte 0 of every page
    of [1 MiB, end) incremented page after page; checked by
    :func:`vmmig.guests.ab_check.check_ab`, block at 0x500.
``dirty``
    Newly dirtied pages at a set rate (``dirty:64M`` is 64 MiB/s), in
    address order or at random; block at 0x600, read by :func:`dirty_counts`.
``regs``
    The register-torture program, whose checkpoint chain
    (:func:`vmmig.guests.emu.regs_check.check_regs_chain`) breaks if any
    register is lost; block at 0x700.

Each source documents its block byte by byte.  :func:`load_program` plays
firmware: it writes into guest RAM what a 64-bit entry needs (through
:func:`load_image`, which also takes any other flat program) and returns
the vCPU's initial registers.  The guest-physical layout::

    0x000500  the program's block (0x500 ab64, 0x600 dirty, 0x700 regs)
    0x000800  GDT: null, 0x08 64-bit code, 0x10 data (flat)
    0x001000  PML4, 0x2000 PDPT, 0x3000.. one page directory per GiB (8 at
              most): RAM identity-mapped with 2 MiB pages, accessed and
              dirty bits preset so the page walker never writes them
    0x010000  the program (PROGRAM_GPA), entered in 64-bit mode; the stack
              grows down from here
    0x100000  (1 MiB) up: the data the program works on

Paging is on, as real firmware would leave it: Unicorn honours the tables
(a test moves one page), at a cost only where a program strides through
memory: ab64 over 16 MiB makes 12 M instructions/s with paging and 17-19 M
without (measured, one vCPU, a shared 2-core host): still 3 M page writes
per second, far beyond what a migration can chase.
"""

from __future__ import annotations

import struct
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import attrs

from vmmig.guests.ab_check import AB_START, INFO_ADDR
from vmmig.guests.build import build_from_source
from vmmig.guests.emu.regs_check import ENTRY_SIZE, REGS_INFO
from vmmig.platforms.emu.vmsa import Segment, Vmsa


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = [
    "DATA_START",
    "DIRTY_INFO",
    "PROGRAMS",
    "PROGRAM_GPA",
    "AbParams",
    "DirtyParams",
    "EntryState",
    "ProgramName",
    "RegsParams",
    "build_program",
    "dirty_counts",
    "load_image",
    "load_program",
    "program_source",
]

#: The programs this package ships.
ProgramName = Literal["ab64", "dirty", "regs"]
PROGRAMS: Final = ("ab64", "dirty", "regs")

PAGE_SIZE: Final = 4096
#: Where programs are linked and, unless told otherwise, loaded; the stack top too.
PROGRAM_GPA: Final = 0x10000
#: First byte of the data area (the a-b region's fixed start).
DATA_START: Final = AB_START
#: The dirty program's block.
DIRTY_INFO: Final = 0x600
#: Length of one dirty tick: short enough for a smooth rate, long enough to idle in.
TICK_SECONDS: Final = 0.001

_GDT = 0x800
_PML4, _PDPT, _PD = 0x1000, 0x2000, 0x3000
_MAX_PDS = 8  # 0x3000-0xafff: the stack keeps 0xb000-0xffff
_GIB = 1 << 30
_LARGE_PAGE = 1 << 21
#: Present, writable, accessed (and for 2 MiB pages: dirty, page size).
_TABLE_FLAGS, _LARGE_FLAGS = 0x23, 0xE3
_GDT_ENTRIES = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
_CODE64, _DATA = Segment(0x08, 0xA9B, 0xFFFFFFFF, 0), Segment(0x10, 0xC93, 0xFFFFFFFF, 0)
#: Control registers of 64-bit mode with paging and SSE.
_CR0 = 0x8001_0033  # PG WP NE ET MP PE
_CR4 = 0x620  # OSXMMEXCPT OSFXSR PAE
_EFER = 0x500  # LMA LME
_DIRTY = struct.Struct("<10Q")


@attrs.frozen
class AbParams:
    """Where ab64 works: [1 MiB, end), and for how long.

    :param end: end of the region, exclusive, page aligned, at most 4 GiB;
        None for the end of RAM (or 4 GiB).
    :param passes: halt after this many passes; 0 to run for ever.
    """

    end: int | None = None
    passes: int = attrs.field(default=0, validator=[attrs.validators.ge(0),
                                                    attrs.validators.lt(1 << 32)])


@attrs.frozen
class DirtyParams:
    """What the dirty program writes, and how fast.

    :param bytes_per_second: newly dirtied memory per second (pages of 4 KiB),
        below 2**64: the guest reads it as a u64.
    :param start: first byte of the region, page aligned, at least 1 MiB.
    :param end: end of the region, exclusive, page aligned; None for the end of RAM.
    :param pattern: pages in address order, or at random.
    :param seed: the random pattern's xorshift64 seed, non-zero.
    """

    bytes_per_second: int = attrs.field(default=64 << 20,
                                        validator=[attrs.validators.gt(0),
                                                   attrs.validators.lt(1 << 64)])
    start: int = DATA_START
    end: int | None = None
    pattern: Literal["sequential", "random"] = "sequential"
    seed: int = attrs.field(default=0x9E3779B97F4A7C15,
                            validator=[attrs.validators.gt(0), attrs.validators.lt(1 << 64)])


@attrs.frozen
class RegsParams:
    """The regs program's checkpoint ring, placed at 1 MiB.

    :param ring_entries: ring slots of 512 bytes; the default ring (8 MiB)
        holds some 15 s of checkpoints at the measured 1,000 per second.
    """

    ring_entries: int = attrs.field(default=16384, validator=attrs.validators.ge(2))


Params = AbParams | DirtyParams | RegsParams
_PARAMS: Final[dict[str, type[Params]]] = {"ab64": AbParams, "dirty": DirtyParams,
                                            "regs": RegsParams}


@attrs.frozen
class EntryState:
    """What :func:`load_program` left in RAM and how a vCPU enters it.

    :param vmsa: the vCPU's initial registers (64-bit mode, paging, RIP at
        the entry, RSP at the stack top, interrupts off).
    :param image_gpa: where the program was copied.
    :param image_size: its size in bytes.
    """

    vmsa: Vmsa
    image_gpa: int
    image_size: int


def program_source(name: ProgramName) -> bytes:
    """The assembly source of a shipped program.

    :param name: which program.
    :returns: the contents of ``vmmig/guests/emu/<name>.S``.
    """
    return resources.files(__name__).joinpath(f"{name}.S").read_bytes()


def build_program(name: ProgramName, cache_dir: Path | None = None) -> bytes:
    """A shipped program as a flat binary linked at :data:`PROGRAM_GPA`, built or cached.

    :param name: which program.
    :param cache_dir: where builds are kept; the guests' default cache if None.
    :returns: the binary; the programs are position-independent.
    :raises HostRequirementError: GNU as or ld is not installed.
    """
    path = build_from_source(program_source(name), stem=name, cache_dir=cache_dir,
                             flat64_base=PROGRAM_GPA)
    return path.read_bytes()


def load_program(ram: Buffer, name: ProgramName, entry_gpa: int = PROGRAM_GPA, *,
                 params: Params | None = None, cache_dir: Path | None = None) -> EntryState:
    """Write a shipped program, its block and the 64-bit environment into guest RAM.

    :param ram: the whole guest RAM (GPA 0 at offset 0), writable.
    :param name: which program.
    :param entry_gpa: where to copy it, in [:data:`PROGRAM_GPA`, 1 MiB).
    :param params: the program's parameters; its defaults if None.
    :param cache_dir: where builds are kept; the guests' default cache if None.
    :returns: the initial register state for the vCPU that runs it.
    :raises ValueError: the parameters do not fit the program or the RAM.
    """
    chosen = _PARAMS[name]() if params is None else params
    if not isinstance(chosen, _PARAMS[name]):
        raise ValueError(f"{name} takes {_PARAMS[name].__name__}, not {type(chosen).__name__}")
    entry = load_image(ram, build_program(name, cache_dir), entry_gpa)
    with memoryview(ram) as mv, mv.cast("B") as mem:
        if isinstance(chosen, AbParams):
            _write_ab(mem, chosen)
        elif isinstance(chosen, DirtyParams):
            _write_dirty(mem, chosen)
        else:
            _write_regs(mem, chosen)
    return entry


def load_image(ram: Buffer, image: bytes, entry_gpa: int = PROGRAM_GPA) -> EntryState:
    """Write a flat 64-bit program and the environment it enters into guest RAM.

    The page tables, the GDT and a zeroed block area (0x500-0x7ff), as in the
    module doc; the program's own parameters are the caller's business.

    :param ram: the whole guest RAM (GPA 0 at offset 0), writable.
    :param image: the program, linked at :data:`PROGRAM_GPA` or position-independent.
    :param entry_gpa: where to copy it and enter it, in [:data:`PROGRAM_GPA`, 1 MiB).
    :returns: the initial register state for the vCPU that runs it.
    :raises ValueError: the RAM is too small or too large, or the image does not fit.
    """
    with memoryview(ram) as mv, mv.cast("B") as mem:
        size = mem.nbytes
        if size < DATA_START + PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"guest RAM of {size} bytes: need whole pages beyond 1 MiB")
        if not PROGRAM_GPA <= entry_gpa <= DATA_START - len(image):
            raise ValueError(f"a program of {len(image)} bytes cannot be loaded at "
                             f"{entry_gpa:#x}: it must lie in [{PROGRAM_GPA:#x}, {DATA_START:#x})")
        _write_page_tables(mem)
        for i, descriptor in enumerate(_GDT_ENTRIES):
            struct.pack_into("<Q", mem, _GDT + 8 * i, descriptor)
        mem[INFO_ADDR:_GDT] = bytes(_GDT - INFO_ADDR)
        mem[entry_gpa:entry_gpa + len(image)] = image
    vmsa = Vmsa(
        es=_DATA, cs=_CODE64, ss=_DATA, ds=_DATA,
        gdtr=Segment(limit=8 * len(_GDT_ENTRIES) - 1, base=_GDT),
        cr0=_CR0, cr3=_PML4, cr4=_CR4, efer=_EFER,
        rflags=0x2, rip=entry_gpa, rsp=PROGRAM_GPA,
        dr6=0xFFFF0FF0, dr7=0x400, mxcsr=0x1F80,
    )
    return EntryState(vmsa=vmsa, image_gpa=entry_gpa, image_size=len(image))


def dirty_counts(memory: Buffer) -> tuple[int, int]:
    """The dirty program's own counters.

    :param memory: the whole guest RAM.
    :returns: (pages written so far, ticks so far).
    """
    with memoryview(memory) as mv:
        *_, writes, ticks = _DIRTY.unpack_from(mv, DIRTY_INFO)
    return writes, ticks


def _write_page_tables(mem: memoryview) -> None:
    """Identity-map the RAM with 2 MiB pages: PML4[0] -> PDPT -> one PD per GiB."""
    pages = -(-mem.nbytes // _LARGE_PAGE)
    pds = -(-pages // 512)
    if pds > _MAX_PDS:
        raise ValueError(f"guest RAM of {mem.nbytes} bytes: the loader maps at most "
                         f"{_MAX_PDS} GiB")
    mem[_PML4:_PD + pds * PAGE_SIZE] = bytes(_PD + pds * PAGE_SIZE - _PML4)
    struct.pack_into("<Q", mem, _PML4, _PDPT | _TABLE_FLAGS)
    for i in range(pds):
        struct.pack_into("<Q", mem, _PDPT + 8 * i, (_PD + i * PAGE_SIZE) | _TABLE_FLAGS)
    for i in range(pages):
        struct.pack_into("<Q", mem, _PD + 8 * i, i * _LARGE_PAGE | _LARGE_FLAGS)


def _region(mem: memoryview, start: int, end: int | None, limit: int) -> tuple[int, int]:
    """Validate a data region: page aligned, non-empty, above 1 MiB, inside RAM and ``limit``."""
    stop = min(mem.nbytes, limit) if end is None else end
    if (start % PAGE_SIZE or stop % PAGE_SIZE or not DATA_START <= start < stop
            or stop > min(mem.nbytes, limit)):
        raise ValueError(f"region [{start:#x}, {stop:#x}) is not whole pages of guest RAM "
                         f"above {DATA_START:#x} and below {min(mem.nbytes, limit):#x}")
    return start, stop


def _write_ab(mem: memoryview, params: AbParams) -> None:
    start, end = _region(mem, AB_START, params.end, 1 << 32)
    struct.pack_into("<IIII", mem, INFO_ADDR, start, end, 0, params.passes)


def _write_dirty(mem: memoryview, params: DirtyParams) -> None:
    start, end = _region(mem, params.start, params.end, 1 << 64)
    # The rate, not a tick length in TSC cycles: an SEV launch measures this
    # block, so it must not depend on the host; the guest asks CPUID for the TSC.
    per_tick = max(1, round(params.bytes_per_second / PAGE_SIZE * TICK_SECONDS))
    _DIRTY.pack_into(mem, DIRTY_INFO, start, end, per_tick, params.bytes_per_second,
                     params.pattern == "random", params.seed, 0, 0, 0, 0)


def _write_regs(mem: memoryview, params: RegsParams) -> None:
    start = DATA_START
    end = start + params.ring_entries * ENTRY_SIZE
    _region(mem, start, -(-end // PAGE_SIZE) * PAGE_SIZE, 1 << 64)
    struct.pack_into("<2Q", mem, REGS_INFO, start, end)
