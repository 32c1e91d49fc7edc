"""The host side of the MH mailbox against a fake MH: round trips, double buffering, errors."""

from __future__ import annotations

import numpy as np
import pytest
from mh_fake import FakeMh, FakeMonitor, guest_ram

from vmmig.agents.mh_mailbox import MailboxClient, MhRefused
from vmmig.agents.mh_session import open_mailbox
from vmmig.channel.frames import ProtocolError
from vmmig.errors import MigrationFailed
from vmmig.firmware.abi import (
    ABI_VERSION,
    Command,
    HelloReply,
    HelloRequest,
    Status,
)


HELLO = HelloRequest(ABI_VERSION).pack()


@pytest.fixture
def make_mh(tmp_path):
    made: list[FakeMh] = []

    def make(queues: int = 1, **kwds) -> FakeMh:
        mh = FakeMh(tmp_path, guest_ram(64), name=f"mh{len(made)}", queues=queues, **kwds)
        made.append(mh)
        return mh

    yield make
    for mh in made:
        mh.close()


def connect(mh: FakeMh, timeout: float = 10.0) -> MailboxClient:
    info = mh.query()
    return MailboxClient.connect(info["shared-path"], info["mailbox-gpa"], info["mailbox-size"],
                                 info["irq-path"], timeout=timeout)


class TestRoundTrips:
    def test_hello_round_trip(self, make_mh):
        mh = make_mh()
        with connect(mh) as client:
            reply = HelloReply.unpack(client.ask(Command.HELLO, HELLO))
        assert (reply.abi_version, reply.max_batch_pages, reply.ram_pages) == (1, 64, 64)

    @pytest.mark.parametrize("queues", [1, 2])
    def test_two_requests_in_flight_per_queue(self, make_mh, queues):
        """Round robin over the queues, two posted on each before any answer is read."""
        mh = make_mh(queues)
        with connect(mh) as client:
            tickets = [client.submit(Command.HELLO, HELLO) for _ in range(2 * queues)]
            assert sorted((t.queue, t.seq) for t in tickets) == sorted(
                (q, s) for q in range(queues) for s in (1, 2))
            for ticket in tickets:
                reply = client.wait(ticket)
                assert reply.status is Status.OK
                assert HelloReply.unpack(bytes(reply.payload)).ram_pages == 64
            # The slots are free again: a second pass reuses them.
            for ticket in [client.submit(Command.HELLO, HELLO) for _ in range(2 * queues)]:
                assert client.wait(ticket).ok()
        assert mh.answered == [4] * queues

    def test_a_third_request_waits_for_the_first_response_to_be_read(self, make_mh):
        with connect(make_mh()) as client:
            first = client.submit(Command.HELLO, HELLO, queue=0)
            client.submit(Command.HELLO, HELLO, queue=0)
            with pytest.raises(RuntimeError, match="response to request 1 was not read"):
                client.reserve(0)
            client.wait(first)
            assert client.reserve(0).seq == 3

    def test_a_new_client_carries_on_where_a_gone_one_left(self, make_mh):
        """An agent died with requests posted (one answered, one not read): the next
        client waits for the MH to finish them and numbers its own requests after."""
        mh = make_mh()
        client = connect(mh)
        client.ask(Command.HELLO, HELLO)
        client.submit(Command.HELLO, HELLO)  # posted, its answer never read
        client.close()
        with connect(mh) as successor:
            reply = HelloReply.unpack(successor.ask(Command.HELLO, HELLO))
        assert reply.abi_version == ABI_VERSION
        assert mh.answered[0] == 3

    def test_spurious_interrupts_are_tolerated(self, make_mh):
        mh = make_mh()
        with connect(mh) as client:
            client.ask(Command.HELLO, HELLO)
            mh._conn.send(b"\x05")
            mh._conn.send(b"\x00")
            assert HelloReply.unpack(client.ask(Command.HELLO, HELLO)).abi_version == 1

    def test_open_mailbox_from_qmp(self, make_mh, tmp_path):
        mh = make_mh()
        with open_mailbox(FakeMonitor(mh, tmp_path)) as client:
            assert client.queue_count == 1
            assert client.payload_capacity == mh.layout.slot_capacity - 32


class TestErrors:
    def test_refusal_names_the_status(self, make_mh):
        with connect(make_mh()) as client, pytest.raises(MhRefused, match="EXPORT_PAGES: NO_SESSION"
                                                        ) as caught:
            client.ask(Command.EXPORT_PAGES, np.zeros(2, "<u4").tobytes())
        assert caught.value.status is Status.NO_SESSION
        assert isinstance(caught.value, ProtocolError)

    def test_a_stalled_mh_times_out_with_a_clear_error(self, make_mh):
        mh = make_mh()
        mh.stalled.set()
        with connect(mh, timeout=0.2) as client, pytest.raises(
                MigrationFailed, match=r"did not answer HELLO \(queue 0, request 1\) within 0.2 s"):
            client.ask(Command.HELLO, HELLO)

    def test_a_completion_beyond_the_doorbell_is_refused(self, make_mh):
        mh = make_mh()
        mh.stalled.set()  # its own answer would overwrite the forged completion word
        with connect(mh) as client:
            mh._region[64 + 8] = 9
            with pytest.raises(ProtocolError, match="claims request 9 answered"):
                client.ask(Command.HELLO, HELLO)

    def test_not_a_mailbox(self, tmp_path):
        (tmp_path / "shared").write_bytes(bytes(1 << 16))
        with pytest.raises(MigrationFailed, match="cannot reach the MH's interrupt line"):
            MailboxClient.connect(tmp_path / "shared", 0, 1 << 16, tmp_path / "nothing")
