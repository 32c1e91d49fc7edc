"""The agents' channel: frames arrive whole, in order, counted; faults are named."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from vmmig.channel import Channel, FrameHeader, FrameKind, connect, listen
from vmmig.channel.frames import FRAME_HEADER, MAX_PAYLOAD, ProtocolError
from vmmig.channel.stream import ChannelClosed


@pytest.fixture(params=["unix", "tcp"])
def pair(request, tmp_path):
    """A connected (sender, receiver) pair over a Unix socket or loopback TCP."""
    address = f"unix:{tmp_path / 'chan.sock'}" if request.param == "unix" else "tcp:127.0.0.1:0"
    server = listen(address)
    if request.param == "tcp":
        address = f"tcp:127.0.0.1:{server.getsockname()[1]}"
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]))
    thread.start()
    sender = connect(address)
    thread.join(10)
    server.close()
    receiver = Channel(accepted[0])
    yield sender, receiver
    sender.close()
    receiver.close()


def in_thread(function):
    errors: list[BaseException] = []

    def run():
        try:
            function()
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


class TestFrames:
    def test_gathered_parts_arrive_as_one_payload_in_order(self, pair):
        """Parts sent together arrive as one payload; frames keep their order."""
        sender, receiver = pair
        pages = os.urandom(256 * 4096)
        thread, errors = in_thread(lambda: (
            sender.send(FrameKind.PAGES, b"\x01" * 8, memoryview(pages)),
            sender.send_json(FrameKind.ROUND_END, {"round": 1}),
        ))
        header, payload = receiver.receive()
        assert (header.kind, header.sequence) == (FrameKind.PAGES, 0)
        assert bytes(payload) == b"\x01" * 8 + pages
        assert receiver.receive_json() == (FrameKind.ROUND_END, {"round": 1})
        thread.join(10)
        assert not errors

    def test_bytes_are_counted_on_both_ends(self, pair):
        """Both ends count header and payload bytes alike."""
        sender, receiver = pair
        thread, _ = in_thread(lambda: sender.send(FrameKind.CPU_STATE, b"x" * 1000))
        receiver.receive()
        thread.join(10)
        assert sender.bytes_sent == receiver.bytes_received == FRAME_HEADER.size + 1000

    def test_payload_can_land_in_a_callers_buffer(self, pair):
        """receive_payload writes straight into the buffer given (no extra copy)."""
        sender, receiver = pair
        thread, _ = in_thread(lambda: sender.send(FrameKind.PAGES, b"abc" * 100))
        target = bytearray(1000)
        header = receiver.receive_header()
        view = receiver.receive_payload(header, memoryview(target))
        thread.join(10)
        assert bytes(view) == b"abc" * 100
        assert target[:300] == b"abc" * 100

    def test_oversized_frames_are_refused_by_the_sender(self, pair):
        """A payload over the limit is refused before anything is sent."""
        sender, _ = pair
        with pytest.raises(ProtocolError, match="exceeds"):
            sender.send(FrameKind.PAGES, bytearray(MAX_PAYLOAD + 1))
        assert sender.bytes_sent == 0


class TestFaults:
    def test_truncated_frame_is_named(self, pair):
        """A peer that closes mid-frame is reported with how much was missing."""
        sender, receiver = pair
        header = FrameHeader(FrameKind.PAGES, 4096, 0).pack()
        sender.sock.sendall(header + b"x" * 100)
        sender.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelClosed, match="3996 bytes short of a whole frame"):
            receiver.receive()

    def test_close_between_frames(self, pair):
        """A peer that closes cleanly between frames is reported as such."""
        sender, receiver = pair
        sender.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelClosed, match="between frames"):
            receiver.receive()

    @pytest.mark.parametrize(("raw", "message"), [
        (b"XX" + FRAME_HEADER.pack(b"VM", 1, 2, 0, 0)[2:], "not a vmmig channel frame"),
        (FRAME_HEADER.pack(b"VM", 9, 2, 0, 0), "version 9"),
        (FRAME_HEADER.pack(b"VM", 1, 99, 0, 0), "unknown frame kind 99"),
        (FRAME_HEADER.pack(b"VM", 1, 2, MAX_PAYLOAD + 1, 0), "exceeds"),
        (FRAME_HEADER.pack(b"VM", 1, 2, 0, 5), "frame 5 arrived where frame 0 was due"),
    ])
    def test_bad_headers_are_refused(self, pair, raw, message):
        """Garbage, other versions, unknown kinds, huge lengths and gaps are refused."""
        sender, receiver = pair
        sender.sock.sendall(raw)
        with pytest.raises(ProtocolError, match=message):
            receiver.receive()

    def test_replayed_frame_is_refused(self, pair):
        """The same frame sent twice is caught by its sequence number."""
        sender, receiver = pair
        frame = FrameHeader(FrameKind.DONE, 2, 0).pack() + b"{}"
        sender.sock.sendall(frame + frame)
        receiver.receive()
        with pytest.raises(ProtocolError, match="frame 0 arrived where frame 1 was due"):
            receiver.receive()

    def test_refused_connection_names_the_address(self):
        """Connecting where nobody listens says where."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            with pytest.raises(ChannelClosed, match=f"cannot connect to tcp:127.0.0.1:{port}"):
                connect(f"tcp:127.0.0.1:{port}", timeout=5)

    @pytest.mark.parametrize("address", ["tcp:nohost", "udp:1.2.3.4:5", "unix:"])
    def test_bad_addresses(self, address):
        """Malformed addresses are refused with the expected forms."""
        with pytest.raises(ValueError, match="expected tcp:HOST:PORT or unix:PATH"):
            listen(address)
