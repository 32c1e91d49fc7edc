"""Page records on their own: sizes that hide zero pages, round trips, any flipped bit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmmig.firmware.abi import PAGE_SIZE, Refusal, Status
from vmmig.firmware.keys import derive_session_keys
from vmmig.firmware.records import RecordOpener, RecordSealer, page_record_size


KEYS = derive_session_keys(bytes(32), b"\x01" * 32, b"\x02" * 32)
PAGES = 32


def ends(memory: np.ndarray) -> tuple[RecordSealer, RecordOpener]:
    sealer = RecordSealer(memory, KEYS.data, KEYS.session_id, 64)
    opener = RecordOpener(np.zeros_like(memory), KEYS.data, KEYS.session_id, 64)
    return sealer, opener


def memory_with_zeros(zero_mask: list[bool]) -> np.ndarray:
    rng = np.random.default_rng(len(zero_mask))
    memory = rng.integers(1, 256, (len(zero_mask), PAGE_SIZE), dtype=np.uint8)
    memory[np.array(zero_mask, dtype=bool)] = 0
    return memory


zero_masks = st.lists(st.booleans(), min_size=1, max_size=64)


class TestZeroPages:
    @given(zero_masks)
    def test_size_depends_on_page_count_only(self, mask):
        """All-zero, no-zero and mixed batches of n pages give records of one size."""
        gpas = np.arange(len(mask), dtype=np.uint64) * PAGE_SIZE
        mixed, _ = ends(memory_with_zeros(mask))
        dense, _ = ends(memory_with_zeros([False] * len(mask)))
        empty, _ = ends(memory_with_zeros([True] * len(mask)))
        sizes = {len(s.seal(gpas)) for s in (mixed, dense, empty)}
        assert sizes == {page_record_size(len(mask))}

    @given(zero_masks, st.randoms(use_true_random=False))
    def test_round_trip_restores_pages(self, mask, random):
        """Whatever the zero pages and GPA order, the target ends with the source's pages."""
        memory = memory_with_zeros(mask)
        sealer, opener = ends(memory)
        order = list(range(len(mask)))
        random.shuffle(order)
        gpas = np.array(order, dtype=np.uint64) * PAGE_SIZE
        assert opener.open(sealer.seal(gpas)) == (0, len(mask))
        assert np.array_equal(opener.memory, memory)

    def test_a_run_of_consecutive_pages_is_the_same_record_as_a_gathered_batch(self):
        """Sealed straight from RAM (no elision) or gathered (zero pages elided): the
        target opens either into the same pages, and the record sizes agree."""
        memory = memory_with_zeros([False, True, False, True, False, False])
        run = np.arange(1, 5, dtype=np.uint64) * PAGE_SIZE
        shuffled = run[[2, 0, 3, 1]]
        for gpas in (run, shuffled):
            sealer, opener = ends(memory)
            record = sealer.seal(gpas)
            assert len(record) == page_record_size(4)
            assert opener.open(record) == (0, 4)
            assert np.array_equal(opener.memory[1:5], memory[1:5])

    def test_a_run_record_from_an_mh_that_elides_zero_pages_opens_too(self):
        """Another MH may gather a run and elide its zero pages: the target places them
        through its scratch buffer, zero pages zeroed."""

        class GatheringSealer(RecordSealer):
            _seal_run = RecordSealer._seal_gathered

        memory = memory_with_zeros([False, True, True, False, False])
        sealer = GatheringSealer(memory, KEYS.data, KEYS.session_id, 64)
        opener = RecordOpener(np.full_like(memory, 7), KEYS.data, KEYS.session_id, 64)
        assert opener.open(sealer.seal(np.arange(5, dtype=np.uint64) * PAGE_SIZE)) == (0, 5)
        assert np.array_equal(opener.memory, memory)

    def test_a_run_record_is_refused_after_any_flipped_bit(self):
        """The run path's tag covers header, entries and body like the gathered one."""
        memory = memory_with_zeros([False] * 8)
        record = bytearray(ends(memory)[0].seal(np.arange(8, dtype=np.uint64) * PAGE_SIZE))
        for at in (0x40, len(record) // 2, len(record) - 1):
            flipped = bytearray(record)
            flipped[at] ^= 1
            with pytest.raises(Refusal):
                ends(memory)[1].open(flipped)

    def test_zero_page_overwrites_old_content(self):
        """A page that became zero is zeroed on the target, not left stale."""
        memory = memory_with_zeros([False] * 4)
        sealer, opener = ends(memory)
        gpas = np.arange(4, dtype=np.uint64) * PAGE_SIZE
        opener.open(sealer.seal(gpas))
        memory[2] = 0
        opener.open(sealer.seal(gpas[2:3]))
        assert not opener.memory[2].any()
        assert np.array_equal(opener.versions, [1, 1, 2, 1])


class TestTamper:
    @settings(max_examples=200, deadline=None)
    @given(st.data())
    def test_any_flipped_bit_is_refused_and_changes_nothing(self, data):
        """A bit flipped anywhere in a gathered record: refused, memory and state
        unchanged (a run record may be opened in place: the next test)."""
        memory = memory_with_zeros([False, True, False, False])
        sealer, opener = ends(memory)
        record = bytearray(sealer.seal(np.array([0, 2, 1, 3], dtype=np.uint64) * PAGE_SIZE))
        position = data.draw(st.integers(0, len(record) * 8 - 1))
        record[position // 8] ^= 1 << (position % 8)
        with pytest.raises(Refusal) as refusal:
            opener.open(bytes(record))
        assert refusal.value.status in {Status.AUTH_FAILED, Status.BAD_REQUEST, Status.TOO_LARGE}
        assert not opener.memory.any()
        assert opener.next_seq == 0
        assert not opener.versions.any()

    @settings(max_examples=100, deadline=None)
    @given(st.data())
    def test_any_flipped_bit_in_a_run_record_is_refused_and_moves_no_state(self, data):
        """Consecutive pages are opened straight into RAM: a flipped bit is still refused
        and neither the sequence nor any version moves (the handler then poisons the
        session, so those pages never run)."""
        memory = memory_with_zeros([False, True, False, False])
        sealer, opener = ends(memory)
        record = bytearray(sealer.seal(np.arange(4, dtype=np.uint64) * PAGE_SIZE))
        position = data.draw(st.integers(0, len(record) * 8 - 1))
        record[position // 8] ^= 1 << (position % 8)
        with pytest.raises(Refusal) as refusal:
            opener.open(bytes(record))
        assert refusal.value.status in {Status.AUTH_FAILED, Status.BAD_REQUEST, Status.TOO_LARGE}
        assert opener.next_seq == 0
        assert not opener.versions.any()

    def test_truncated_record(self):
        """A record cut short is BAD_REQUEST."""
        sealer, opener = ends(memory_with_zeros([False] * 2))
        record = sealer.seal(np.arange(2, dtype=np.uint64) * PAGE_SIZE)
        with pytest.raises(Refusal) as refusal:
            opener.open(record[:-1])
        assert refusal.value.status is Status.BAD_REQUEST
