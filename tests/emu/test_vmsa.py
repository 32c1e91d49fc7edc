"""The VMSA page: AMD's SEV-ES save-area layout, packed and unpacked losslessly."""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmig.platforms.emu.vmsa import OFFSETS, SEGMENT_NAMES, VMSA_SIZE, XMM_COUNT, Segment, Vmsa


def unsigned(bits: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=(1 << bits) - 1)


segments = st.builds(Segment, unsigned(16), unsigned(16), unsigned(32), unsigned(64))


def field_strategy(field: attrs.Attribute) -> st.SearchStrategy:
    if field.name in SEGMENT_NAMES:
        return segments
    if field.name == "xmm":
        return st.tuples(*[unsigned(128)] * XMM_COUNT)
    return unsigned(32 if field.name == "mxcsr" else 64)


vmsas = st.builds(Vmsa, **{f.name: field_strategy(f) for f in attrs.fields(Vmsa)})


class TestLayout:
    """Field offsets are those of Linux's struct sev_es_save_area."""

    @pytest.mark.parametrize(("name", "offset"), [
        ("es", 0x000), ("cs", 0x010), ("gdtr", 0x060), ("idtr", 0x080), ("tr", 0x090),
        ("efer", 0x0D0), ("cr4", 0x148), ("cr3", 0x150), ("cr0", 0x158), ("dr7", 0x160),
        ("dr6", 0x168), ("rflags", 0x170), ("rip", 0x178), ("rsp", 0x1D8), ("rax", 0x1F8),
        ("cr2", 0x240), ("rcx", 0x308), ("rbx", 0x318), ("rbp", 0x328), ("r8", 0x340),
        ("r15", 0x378), ("mxcsr", 0x408), ("xmm", 0x470),
    ])
    def test_offset_matches_the_linux_header(self, name, offset):
        """Each field sits where arch/x86/include/asm/svm.h puts it."""
        assert OFFSETS[name] == offset

    def test_every_field_has_one_offset(self):
        """The offset table and the class name exactly the same fields."""
        assert set(OFFSETS) == {f.name for f in attrs.fields(Vmsa)}

    def test_values_land_at_their_offsets(self):
        """Packed values are found at their offsets, little-endian, segments as vmcb_seg."""
        page = Vmsa(rip=0x1122334455667788, cs=Segment(0x08, 0xA9B, 0xFFFFFFFF, 0x1000),
                    mxcsr=0x1F80, xmm=(0,) * 7 + ((1 << 127) | 5,) + (0,) * 8).pack()
        assert struct.unpack_from("<Q", page, 0x178)[0] == 0x1122334455667788
        assert struct.unpack_from("<HHIQ", page, 0x10) == (0x08, 0xA9B, 0xFFFFFFFF, 0x1000)
        assert struct.unpack_from("<I", page, 0x408)[0] == 0x1F80
        assert struct.unpack_from("<QQ", page, 0x470 + 7 * 16) == (5, 1 << 63)

    def test_unmodelled_bytes_are_zero(self):
        """Bytes vmmig does not model pack as zero: the reserved RSP slot at 0x320, for one."""
        page = Vmsa(rsp=(1 << 64) - 1, rbx=(1 << 64) - 1, rbp=(1 << 64) - 1).pack()
        assert page[0x320:0x328] == bytes(8)
        assert page[0x670:] == bytes(VMSA_SIZE - 0x670)


class TestPack:
    """pack() and unpack() are inverse and refuse what is not a VMSA."""

    @given(vmsas)
    def test_round_trip(self, vmsa):
        """Any register values survive pack and unpack unchanged, in exactly one page."""
        page = vmsa.pack()
        assert len(page) == VMSA_SIZE
        assert Vmsa.unpack(page) == vmsa

    def test_wrong_size_is_refused(self):
        """unpack() takes exactly one 4 KiB page."""
        with pytest.raises(ValueError, match="4096 bytes"):
            Vmsa.unpack(bytes(4095))

    @pytest.mark.parametrize("changes", [
        {"rax": 1 << 64}, {"rip": -1}, {"mxcsr": 1 << 32}, {"xmm": (0,) * 15},
        {"xmm": (1 << 128,) + (0,) * 15},
    ])
    def test_out_of_range_values_are_refused(self, changes):
        """A value that does not fit its register is refused when the Vmsa is made."""
        with pytest.raises(ValueError, match="unsigned"):
            Vmsa(**changes)

    def test_segment_fields_are_checked(self):
        """A selector wider than 16 bits is refused."""
        with pytest.raises(ValueError, match="selector"):
            Segment(selector=1 << 16)
