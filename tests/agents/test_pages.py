"""The plain page path: what the source batches is exactly what the target writes."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from vmmig.agents.pages import BATCH_PAGES, PAGE, PageBatcher, PageReceiver, ram_pages
from vmmig.channel import Channel, FrameKind
from vmmig.channel.frames import FrameHeader, ProtocolError


@pytest.fixture
def link():
    """A connected (sender, receiver) channel pair."""
    left, right = socket.socketpair()
    with Channel(left) as sender, Channel(right) as receiver:
        yield sender, receiver


def transfer(link, parts, target):
    """Send a PAGES payload and receive it into ``target``; returns the pages written."""
    sender, receiver = link
    sender.send(FrameKind.PAGES, *parts)
    return PageReceiver(target).receive(receiver, receiver.receive_header())


def send_raw(link, payload):
    """Send a raw PAGES frame and return the receiving end's header."""
    sender, receiver = link
    sender.sock.sendall(FrameHeader(FrameKind.PAGES, len(payload), 0).pack() + payload)
    return receiver, receiver.receive_header()


@pytest.fixture
def source():
    rng = np.random.default_rng(1)
    ram = rng.integers(0, 256, size=64 * PAGE, dtype=np.uint8)
    ram[5 * PAGE:8 * PAGE] = 0  # three zero pages
    return ram.reshape(-1, PAGE)


class TestBatches:
    @pytest.mark.parametrize("numbers", [[3, 5, 6, 40, 7, 0], [8, 9, 10, 11], [4, 5, 6, 7, 8],
                                         [5, 7], [5, 6, 7]])
    def test_batch_round_trips_into_the_target(self, source, link, numbers):
        """Pages land at the same GPAs on the target: scattered, consecutive, with zero pages,
        only zero pages."""
        target = np.full_like(source, 0xAA)
        numbers = np.array(numbers, dtype=np.uint64)
        assert transfer(link, PageBatcher(source).batch(numbers), target) == len(numbers)
        assert (target[numbers] == source[numbers]).all()
        untouched = np.setdiff1d(np.arange(64), numbers)
        assert (target[untouched] == 0xAA).all()

    def test_consecutive_pages_are_sent_from_the_mapping_itself(self, source):
        """A run of non-zero consecutive pages is not copied on the source: the view is RAM."""
        parts = PageBatcher(source).batch(np.array([8, 9, 10], dtype=np.uint64))
        source[9, 0] ^= 0xFF
        assert bytes(parts[2][PAGE:PAGE + 1]) == bytes([source[9, 0]])

    def test_zero_pages_are_counted_and_sent_without_contents(self, source):
        """Zero pages cost only their GPA on the channel."""
        batcher = PageBatcher(source)
        parts = batcher.batch(np.array([5, 6, 7, 9], dtype=np.uint64))
        assert (batcher.zero, batcher.normal) == (3, 1)
        assert sum(p.nbytes for p in parts) == 8 + 4 * 8 + PAGE

    def test_without_elision_every_page_carries_its_contents(self, source):
        """With zero elision off (as SEV requires) zero pages are sent in full."""
        batcher = PageBatcher(source, elide_zero=False)
        parts = batcher.batch(np.array([5, 6], dtype=np.uint64))
        assert sum(p.nbytes for p in parts) == 8 + 2 * 8 + 2 * PAGE
        assert batcher.zero == 0

    def test_batch_size_is_bounded(self, source):
        """More than a batch of pages is refused."""
        with pytest.raises(ValueError, match="exceed a batch"):
            PageBatcher(source).batch(np.zeros(BATCH_PAGES + 1, dtype=np.uint64))

    def test_ram_view_is_not_a_copy(self):
        """ram_pages views the mapping itself: a write through it is a write to RAM."""
        buffer = bytearray(4 * PAGE)
        ram_pages(buffer, writable=True)[2, 0] = 7
        assert buffer[2 * PAGE] == 7


class TestMalformed:
    @pytest.mark.parametrize("payload", [
        b"\x01\x00",
        (2).to_bytes(4, "little") + (0).to_bytes(4, "little") + bytes(16),
        (1).to_bytes(4, "little") + (2).to_bytes(4, "little") + bytes(8),
        (BATCH_PAGES + 1).to_bytes(4, "little") + (BATCH_PAGES + 1).to_bytes(4, "little")
        + bytes(8 * (BATCH_PAGES + 1)),
    ])
    def test_wrong_sizes_are_refused(self, link, payload):
        """Counts that do not match the payload's size, or exceed a batch, are protocol errors."""
        receiver, header = send_raw(link, payload)
        with pytest.raises(ProtocolError):
            PageReceiver(np.zeros((4, PAGE), dtype=np.uint8)).receive(receiver, header)

    @pytest.mark.parametrize("gpa", [4 * PAGE, 100, 1 << 40])
    def test_gpas_outside_ram_or_unaligned_are_refused(self, link, gpa):
        """A GPA beyond RAM or inside a page is refused before anything is written."""
        ram = np.zeros((4, PAGE), dtype=np.uint8)
        payload = ((1).to_bytes(4, "little") + (0).to_bytes(4, "little")
                   + gpa.to_bytes(8, "little") + b"\xff" * PAGE)
        receiver, header = send_raw(link, payload)
        with pytest.raises(ProtocolError, match="outside guest RAM"):
            PageReceiver(ram).receive(receiver, header)
        assert not ram.any()
