"""The VMSA: one vCPU's register state in AMD's SEV-ES save-area layout.

Under SEV-ES a vCPU's registers live in a 4 KiB page, the VM Save Area,
encrypted with the guest's key; the hypervisor can neither read nor change
them.  The emulated platform keeps its vCPUs' state in the same layout, so
the page it encrypts, measures at launch and migrates is byte for byte what
the hardware's would be.

The layout is Linux's ``struct sev_es_save_area`` (arch/x86/include/asm/svm.h;
AMD APM vol. 2, table B-4), of which :data:`OFFSETS` names the fields vmmig
keeps.  Each segment register is a 16-byte ``struct vmcb_seg``::

    +0 u16 selector   +2 u16 attrib   +4 u32 limit   +8 u64 base

``attrib`` packs descriptor bits 40-47 (type, S, DPL, P) into its bits 0-7 and
bits 52-55 (AVL, L, D/B, G) into bits 8-11.

SSE state is part of the layout in current Linux headers (the save area is
1648 bytes, ``EXPECTED_SEV_ES_SAVE_AREA_SIZE``): ``mxcsr`` at 0x408 and
``fpreg_xmm`` (XMM0-15, 16 bytes each, little-endian) at 0x470, so vmmig
needs no private region of the page.  Every byte vmmig does not model packs
as zero.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs


__all__ = ["OFFSETS", "SEGMENT_NAMES", "VMSA_SIZE", "XMM_COUNT", "Segment", "Vmsa"]

#: Size of the VMSA page.
VMSA_SIZE: Final = 4096
#: XMM registers kept (XMM0-15: the 64-bit mode set without AVX-512).
XMM_COUNT: Final = 16

#: The ten segment-like registers, in VMSA order.
SEGMENT_NAMES: Final = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

#: Byte offset of every field vmmig keeps, as in ``struct sev_es_save_area``:
#: the single source of truth for the layout.
OFFSETS: Final[Mapping[str, int]] = MappingProxyType({
    **{name: 0x10 * i for i, name in enumerate(SEGMENT_NAMES)},
    "efer": 0x0D0,
    "cr4": 0x148,
    "cr3": 0x150,
    "cr0": 0x158,
    "dr7": 0x160,
    "dr6": 0x168,
    "rflags": 0x170,
    "rip": 0x178,
    "rsp": 0x1D8,
    "rax": 0x1F8,
    "cr2": 0x240,
    "rcx": 0x308,
    "rdx": 0x310,
    "rbx": 0x318,
    # 0x320 is reserved: RSP is at 0x1d8.
    "rbp": 0x328,
    "rsi": 0x330,
    "rdi": 0x338,
    "r8": 0x340,
    "r9": 0x348,
    "r10": 0x350,
    "r11": 0x358,
    "r12": 0x360,
    "r13": 0x368,
    "r14": 0x370,
    "r15": 0x378,
    "mxcsr": 0x408,
    "xmm": 0x470,
})

_SEGMENT = struct.Struct("<HHIQ")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_XMM = struct.Struct(f"<{2 * XMM_COUNT}Q")
_MASK64 = (1 << 64) - 1


def _fits(bits: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    """An attrs validator: the value is an unsigned integer of ``bits`` bits."""

    def check(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"{attribute.name}={value:#x} is not a {bits}-bit unsigned value")

    return check


def _check_xmm(_instance: object, attribute: attrs.Attribute[tuple[int, ...]],
               value: tuple[int, ...]) -> None:
    """XMM0-15 are exactly 16 values of 128 bits."""
    if len(value) != XMM_COUNT or not all(0 <= v < 1 << 128 for v in value):
        raise ValueError(f"{attribute.name} must be {XMM_COUNT} unsigned 128-bit values")


def _u64(default: int = 0) -> int:
    """A 64-bit register field."""
    result: int = attrs.field(default=default, validator=_fits(64))
    return result


@attrs.frozen
class Segment:
    """One ``struct vmcb_seg``: a segment register with its hidden part, or GDTR/IDTR.

    :param selector: the visible selector (unused by GDTR and IDTR).
    :param attrib: descriptor attributes in the VMCB packing (see the module doc).
    :param limit: the expanded byte limit.
    :param base: the base address.
    """

    selector: int = attrs.field(default=0, validator=_fits(16))
    attrib: int = attrs.field(default=0, validator=_fits(16))
    limit: int = attrs.field(default=0, validator=_fits(32))
    base: int = attrs.field(default=0, validator=_fits(64))


@attrs.frozen
class Vmsa:
    """A vCPU's register values, packable into and out of the VMSA page.

    Fields are named as in ``struct sev_es_save_area``; ``xmm`` holds XMM0-15
    as 128-bit integers (bit 0 is the least significant bit of the register).
    """

    es: Segment = Segment()
    cs: Segment = Segment()
    ss: Segment = Segment()
    ds: Segment = Segment()
    fs: Segment = Segment()
    gs: Segment = Segment()
    gdtr: Segment = Segment()
    ldtr: Segment = Segment()
    idtr: Segment = Segment()
    tr: Segment = Segment()
    efer: int = _u64()
    cr4: int = _u64()
    cr3: int = _u64()
    cr0: int = _u64()
    dr7: int = _u64()
    dr6: int = _u64()
    rflags: int = _u64()
    rip: int = _u64()
    rsp: int = _u64()
    rax: int = _u64()
    cr2: int = _u64()
    rcx: int = _u64()
    rdx: int = _u64()
    rbx: int = _u64()
    rbp: int = _u64()
    rsi: int = _u64()
    rdi: int = _u64()
    r8: int = _u64()
    r9: int = _u64()
    r10: int = _u64()
    r11: int = _u64()
    r12: int = _u64()
    r13: int = _u64()
    r14: int = _u64()
    r15: int = _u64()
    mxcsr: int = attrs.field(default=0, validator=_fits(32))
    xmm: tuple[int, ...] = attrs.field(default=(0,) * XMM_COUNT, converter=tuple,
                                       validator=_check_xmm)

    def pack(self) -> bytes:
        """The VMSA page holding these registers.

        :returns: exactly :data:`VMSA_SIZE` bytes; fields vmmig does not keep are zero.
        """
        page = bytearray(VMSA_SIZE)
        for name, offset in OFFSETS.items():
            value = getattr(self, name)
            if isinstance(value, Segment):
                _SEGMENT.pack_into(page, offset, value.selector, value.attrib, value.limit,
                                   value.base)
            elif name == "xmm":
                _XMM.pack_into(page, offset,
                               *(half for v in value for half in (v & _MASK64, v >> 64)))
            elif name == "mxcsr":
                _U32.pack_into(page, offset, value)
            else:
                _U64.pack_into(page, offset, value)
        return bytes(page)

    @classmethod
    def unpack(cls, page: bytes) -> Vmsa:
        """Read the registers out of a VMSA page.

        :param page: a whole VMSA page, :data:`VMSA_SIZE` bytes.
        :returns: the registers it holds; bytes vmmig does not model are ignored.
        :raises ValueError: the page is not :data:`VMSA_SIZE` bytes long.
        """
        if len(page) != VMSA_SIZE:
            raise ValueError(f"a VMSA page is {VMSA_SIZE} bytes, not {len(page)}")
        values: dict[str, Any] = {}
        for name, offset in OFFSETS.items():
            if name in SEGMENT_NAMES:
                values[name] = Segment(*_SEGMENT.unpack_from(page, offset))
            elif name == "xmm":
                halves = _XMM.unpack_from(page, offset)
                values[name] = tuple(lo | hi << 64 for lo, hi in zip(halves[::2], halves[1::2],
                                                                    strict=True))
            elif name == "mxcsr":
                values[name] = _U32.unpack_from(page, offset)[0]
            else:
                values[name] = _U64.unpack_from(page, offset)[0]
        return cls(**values)
