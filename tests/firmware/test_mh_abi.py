"""The mailbox ABI: round trips, layout, and malformed requests from a hostile host."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mh_support import SECRET, guest_memory, pair

from vmmig.firmware.abi import (
    HEADER_SIZE,
    Command,
    HelloReply,
    HelloRequest,
    MailboxLayout,
    OpenSessionReply,
    OpenSessionRequest,
    Refusal,
    Request,
    Role,
    Status,
    pack_export_request,
    pack_request,
    unpack_export_request,
    unpack_request,
    unpack_response,
)
from vmmig.firmware.handler import MigrationHandler
from vmmig.firmware.records import page_record_size


commands = st.sampled_from(list(Command))


class TestRoundTrips:
    @given(commands, st.integers(0, 2**64 - 1), st.binary(max_size=200))
    def test_request(self, command, seq, payload):
        """pack_request then unpack_request gives the request back."""
        request = Request(command, seq, payload)
        assert unpack_request(pack_request(request)) == request

    @given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
    def test_hello(self, version, caps):
        """HELLO request payloads round-trip."""
        hello = HelloRequest(version, caps)
        assert HelloRequest.unpack(hello.pack()) == hello

    def test_hello_reply(self):
        """HELLO reply payloads round-trip."""
        reply = HelloReply(1, 512, 11, 2, Role.SOURCE, 4096)
        assert HelloReply.unpack(reply.pack()) == reply

    @given(st.sampled_from([Role.SOURCE, Role.TARGET]), st.binary(min_size=32, max_size=32))
    def test_open_session(self, role, nonce):
        """OPEN_SESSION payloads round-trip, request and reply."""
        request = OpenSessionRequest(role, nonce)
        assert OpenSessionRequest.unpack(request.pack()) == request
        reply = OpenSessionReply(nonce, nonce[::-1])
        assert OpenSessionReply.unpack(reply.pack()) == reply

    @given(st.lists(st.integers(0, 2**40).map(lambda p: p * 4096), min_size=1, max_size=512))
    def test_export_request(self, gpas):
        """EXPORT_PAGES payloads round-trip up to the batch limit."""
        parsed = unpack_export_request(pack_export_request(gpas), 512)
        assert parsed.tolist() == gpas


class TestMalformed:
    @pytest.mark.parametrize(
        ("data", "status"),
        [
            (b"", Status.BAD_REQUEST),
            (b"\x01" * 10, Status.BAD_REQUEST),
            (pack_request(Request(Command.HELLO, 1, b"x"))[:-1], Status.BAD_REQUEST),
            (pack_request(Request(Command.HELLO, 1)) + b"x", Status.BAD_REQUEST),
            (b"\x99" + bytes(HEADER_SIZE - 1), Status.UNSUPPORTED),
            (pack_request(Request(Command.HELLO, 1, bytes(15))), Status.BAD_REQUEST),
            (pack_request(Request(Command.HELLO, 1, HelloRequest(2).pack())), Status.UNSUPPORTED),
            (pack_request(Request(Command.OPEN_SESSION, 1, bytes(40))), Status.BAD_REQUEST),
        ],
    )
    def test_refused_with_a_status(self, data, status):
        """Short, long, unknown or badly filled requests get a status, never an exception."""
        mh = MigrationHandler(guest_memory(4), SECRET)
        assert unpack_response(mh.handle(data)).status is status

    def test_reserved_header_bytes(self):
        """A set reserved byte in the request header is BAD_REQUEST."""
        data = bytearray(pack_request(Request(Command.HELLO, 1, HelloRequest(1).pack())))
        data[20] = 1
        with pytest.raises(Refusal) as refusal:
            unpack_request(data)
        assert refusal.value.status is Status.BAD_REQUEST

    @settings(max_examples=300, deadline=None)
    @given(commands, st.binary(max_size=300), st.integers(0, 3))
    def test_random_payloads_never_escape(self, command, payload, stage):
        """Any payload for any command, in any state, yields a parseable response."""
        source, target = pair(guest_memory(8))
        host = (source, target)[stage % 2]
        if stage >= 2:
            host.call(Command.ABORT)
        response = host.call(command, payload)
        assert response.status in Status

    @given(st.binary(min_size=0, max_size=120))
    def test_random_bytes_never_escape(self, data):
        """Arbitrary bytes in a slot give a response, whatever they are."""
        mh = MigrationHandler(guest_memory(2), SECRET)
        assert unpack_response(mh.handle(data)).status is not Status.OK or data[:4] == bytes(
            [Command.HELLO, 0, 0, 0]
        )


class TestLayout:
    def test_header_round_trip(self):
        """A host reads back the layout the MH wrote."""
        layout = MailboxLayout(queue_count=4, max_batch_pages=512)
        assert MailboxLayout.unpack_header(layout.pack_header()) == layout

    def test_slot_fits_a_full_export_reply(self):
        """One slot holds the largest EXPORT reply, header included."""
        layout = MailboxLayout(max_batch_pages=512)
        assert layout.slot_capacity >= HEADER_SIZE + page_record_size(512)
        assert layout.slot_capacity % 4096 == 0

    def test_slots_do_not_overlap(self):
        """Slots are page-aligned, disjoint and inside the region."""
        layout = MailboxLayout(queue_count=3, max_batch_pages=64)
        offsets = [layout.slot_offset(q, s) for q in range(3) for s in (0, 1)]
        assert offsets == sorted(offsets)
        assert all(b - a == layout.slot_capacity for a, b in itertools.pairwise(offsets))
        assert offsets[0] % 4096 == 0
        assert offsets[-1] + layout.slot_capacity == layout.region_size

    def test_queue_descriptor(self):
        """A queue descriptor names its two slots and the doorbell words."""
        layout = MailboxLayout(queue_count=2)
        fields = MailboxLayout.unpack_queue(layout.pack_queue(1, 7, 6), 0)
        assert (
            fields
            == (7, 6, layout.slot_offset(1, 0), layout.slot_offset(1, 1))
            + (layout.slot_capacity,) * 2
        )

    def test_bad_header(self):
        """A wrong magic or inconsistent sizes are refused by the host's reader."""
        data = bytearray(MailboxLayout().pack_header())
        data[0] ^= 1
        with pytest.raises(ValueError, match="mailbox"):
            MailboxLayout.unpack_header(data)

    def test_export_batch_limits(self):
        """More GPAs than the batch limit is TOO_LARGE; a count/size mismatch BAD_REQUEST."""
        with pytest.raises(Refusal) as too_large:
            unpack_export_request(pack_export_request(np.zeros(9, np.uint64)), 8)
        assert too_large.value.status is Status.TOO_LARGE
        with pytest.raises(Refusal) as bad:
            unpack_export_request(pack_export_request([0, 4096])[:-1], 8)
        assert bad.value.status is Status.BAD_REQUEST
