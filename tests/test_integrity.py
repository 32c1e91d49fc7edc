"""Technology-neutral memory comparison, on buffers and on RAM files."""

from __future__ import annotations

import pytest

from vmmig.integrity import PAGE, compare_memory, compare_ram_files, human_size


def memory(pages: int, seed: int = 7) -> bytearray:
    # A period of 251 bytes makes every page different from its neighbours.
    period = bytes((seed + i) % 251 for i in range(251))
    return bytearray((period * (pages * PAGE // 251 + 1))[: pages * PAGE])


class TestCompareMemory:
    def test_identical_memories(self):
        """Equal buffers compare identical and say so with their size."""
        a = memory(8)
        result = compare_memory(a, bytes(a))
        assert result.identical
        assert result.describe() == "32.0 KiB identical"

    def test_differing_pages_are_counted_and_the_first_is_named(self):
        """Each differing page counts once; the lowest GPA is reported."""
        a, b = memory(8), memory(8)
        b[5 * PAGE + 17] ^= 1
        b[2 * PAGE] ^= 0x80
        b[2 * PAGE + 4095] ^= 0x80
        result = compare_memory(a, b)
        assert (result.differing_pages, result.first_gpa) == (2, 2 * PAGE)
        assert result.describe() == "2 of 8 pages differ, first at GPA 0x2000"

    def test_sizes_that_differ_never_compare_equal(self):
        """A shorter target counts its missing pages as differing."""
        a = memory(8)
        result = compare_memory(a, a[: 6 * PAGE])
        assert (result.differing_pages, result.first_gpa) == (2, 6 * PAGE)


class TestCompareRamFiles:
    @pytest.fixture
    def files(self, tmp_path):
        a = memory(9000)  # 35 MiB: three 16 MiB chunks
        source, target = tmp_path / "src.ram", tmp_path / "dst.ram"
        source.write_bytes(a)
        target.write_bytes(a)
        return source, target

    def test_identical_files(self, files):
        """Identical RAM files compare identical; page heads and page 0 come from the target."""
        scan = compare_ram_files(*files)
        assert scan.comparison.identical
        data = files[1].read_bytes()
        assert scan.page_heads == data[::PAGE]
        assert scan.first_page == data[:PAGE]
        assert scan.size == len(data)

    def test_a_change_in_a_later_chunk_is_found(self, files):
        """A flipped byte far into the file is found at its GPA."""
        source, target = files
        with target.open("r+b") as stream:
            stream.seek(8500 * PAGE + 3)
            byte = stream.read(1)
            stream.seek(8500 * PAGE + 3)
            stream.write(bytes([byte[0] ^ 0xFF]))
        scan = compare_ram_files(source, target)
        assert (scan.comparison.differing_pages, scan.comparison.first_gpa) == (1, 8500 * PAGE)


def test_human_size():
    """Sizes read like QEMU's: binary units, one decimal."""
    assert [human_size(n) for n in (512, 1536, 1 << 30)] == ["512 B", "1.5 KiB", "1.0 GiB"]
