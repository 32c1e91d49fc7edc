"""Whole MH-path migrations between two fake MHs: the engine, the session, a hostile channel."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from mh_fake import FakeMh, FakeMonitor, guest_ram

from hostile_proxy import read_exactly
from vmmig.agents import agent
from vmmig.agents.agent import AgentOptions
from vmmig.agents.engine import run_source
from vmmig.agents.mh_session import SourceSession, open_mailbox, receive_guest
from vmmig.channel import FRAME_HEADER, Channel, FrameKind
from vmmig.core.precopy import PrecopyLimits
from vmmig.errors import MigrationFailed, VmmigError
from vmmig.firmware.states import MhState


PAGES = 600  # not a multiple of the batch: a short last record


class TamperProxy:
    """Forwards the channel both ways; flips a byte of PAGES frame ``frame`` (or the "last")."""

    def __init__(self, frame: int | str | None) -> None:
        self.source_end, self._from_source = socket.socketpair()
        self._to_target, self.target_end = socket.socketpair()
        self.frame = frame
        self.flipped = False
        self._threads = [threading.Thread(target=self._forward, daemon=True),
                         threading.Thread(target=self._backward, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _forward(self) -> None:
        # From a PAGES frame on, frames wait until the next PAGES or CPU_STATE frame
        # says whether that PAGES frame was the stream's last.
        pages, held = 0, []
        with contextlib.suppress(EOFError, OSError):
            while True:
                header = read_exactly(self._from_source, FRAME_HEADER.size)
                _, _, kind, length, _ = FRAME_HEADER.unpack(header)
                frame = header + read_exactly(self._from_source, length)
                if kind in (FrameKind.PAGES, FrameKind.CPU_STATE) and held:
                    if self.frame == "last" and kind == FrameKind.CPU_STATE:
                        self._flip(held[0])
                    self._to_target.sendall(b"".join(held))
                    held = []
                if kind == FrameKind.PAGES:
                    if pages == self.frame:
                        self._flip(frame)
                    pages += 1
                if kind == FrameKind.PAGES or held:
                    held.append(frame)
                else:
                    self._to_target.sendall(frame)
        self._shut()

    def _flip(self, frame: bytearray) -> None:
        frame[len(frame) // 2] ^= 0x40
        self.flipped = True

    def _backward(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self._to_target.recv(1 << 16):
                self._from_source.sendall(chunk)
        self._shut()

    def close(self) -> None:
        self._shut()
        for thread in self._threads:
            thread.join(5)
        self._from_source.close()
        self._to_target.close()

    def _shut(self) -> None:
        for sock in (self._from_source, self._to_target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def pair(tmp_path):
    source = FakeMh(tmp_path, guest_ram(PAGES, seed=3), name="src", queues=2, max_batch=64)
    target = FakeMh(tmp_path, np.zeros((PAGES, 4096), np.uint8), name="dst", max_batch=48)
    yield source, target, tmp_path
    source.close()
    target.close()


def migrate(pair, *, tamper: int | str | None = None, timeout: float = 10.0):
    """Run both agents' MH paths; returns the source's result or error, and the events."""
    source_mh, target_mh, run_dir = pair
    source_qmp = FakeMonitor(source_mh, run_dir, dirty=40)
    target_qmp = FakeMonitor(target_mh, run_dir)
    proxy = TamperProxy(tamper)
    events: dict[str, list[str]] = {"source": [], "target": []}
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            with open_mailbox(target_qmp, timeout) as client, Channel(proxy.target_end) as channel:
                receive_guest(target_qmp, client, channel,
                              lambda e, **data: events["target"].append(e) or outcome.update(data),
                              lambda: None)
        except VmmigError as err:
            outcome["target-error"] = str(err)

    thread = threading.Thread(target=target)
    thread.start()
    with open_mailbox(source_qmp, timeout) as client, Channel(proxy.source_end) as channel:
        try:
            session = SourceSession.open(client, channel)
        except MigrationFailed as err:
            outcome["source-error"] = str(err)
            session = None
        try:
            if session is None:
                raise MigrationFailed("no session")
            outcome["result"] = run_source(source_qmp, channel,
                                           PrecopyLimits(downtime_limit=0.001, max_rounds=3),
                                           pages=session.pages)
            session.commit(lambda e, **_: events["source"].append(e))
        except VmmigError as err:
            if session is not None:
                outcome["source-error"] = session.abort(err)
    thread.join(30)
    assert not thread.is_alive()
    proxy.close()
    outcome["flipped"] = proxy.flipped
    return outcome, events, target_qmp


class TestMigration:
    def test_memory_arrives_and_both_mhs_commit(self, pair):
        source_mh, target_mh, _ = pair
        outcome, events, target_qmp = migrate(pair)
        assert "source-error" not in outcome, outcome
        assert "target-error" not in outcome, outcome
        assert np.array_equal(source_mh.memory, target_mh.memory)
        assert source_mh.handler.state is MhState.SOURCE_RETIRED
        assert target_mh.handler.state is MhState.TARGET_COMMITTED
        assert events == {"source": ["manifest", "committed"],
                          "target": ["received", "verified", "committed"]}
        result = outcome["result"]
        assert len(result.rounds) >= 2  # the dirtied pages went in later rounds
        assert target_qmp.vcpus == [{"rip": 0x1234}]
        # Every page once at least; every written page counted on the target.
        assert result.normal >= PAGES
        assert outcome["pages"] == result.normal

    def test_the_host_never_learns_which_pages_are_zero(self, pair):
        source_mh, _, _ = pair
        assert (~source_mh.memory.any(axis=1)).sum() > 50  # the guest has zero pages
        outcome, _, _ = migrate(pair)
        assert outcome["result"].zero == 0

    def test_batches_use_both_source_queues(self, pair):
        source_mh, _, _ = pair
        migrate(pair)
        assert all(count > 3 for count in source_mh.answered)


class TestHostileChannel:
    @pytest.mark.parametrize("frame", [1, "last"], ids=["during-precopy", "last-record"])
    def test_a_tampered_record_is_refused_and_nobody_commits(self, pair, frame):
        """The target's MH refuses; the source learns why; both MHs end idle, none commits.

        The last record is found only after the stream ended, when the source
        already sealed its manifest: it aborts on the target's abort token.
        """
        source_mh, target_mh, _ = pair
        outcome, events, _ = migrate(pair, tamper=frame)
        assert outcome["flipped"]
        assert "AUTH_FAILED" in outcome["target-error"]
        assert "AUTH_FAILED" in outcome["source-error"]
        assert outcome["source-error"].startswith("target: ")
        assert "committed" not in events["source"] + events["target"]
        assert target_mh.handler.state is MhState.IDLE
        assert source_mh.handler.state is MhState.IDLE
        assert events["source"] == (["manifest"] if frame == "last" else [])

    def test_a_stalled_target_mh_is_a_clear_error(self, pair):
        _, target_mh, _ = pair
        target_mh.stalled.set()
        outcome, events, _ = migrate(pair, timeout=0.5)
        assert "did not answer HELLO" in outcome["target-error"]
        assert "did not answer HELLO" in outcome["source-error"]
        assert events["source"] == []


class TestAgents:
    def test_agents_with_the_mh_page_path_report_manifest_and_commit(self, pair):
        """The agent processes' logic (`--page-path mh`), with the fake machines' QMP."""
        source_mh, target_mh, run_dir = pair
        address = f"unix:{run_dir}/channel.sock"
        target_events = io.StringIO()

        def target() -> None:
            options = AgentOptions(role="target", qmp="-", address=address, page_path="mh")
            agent._target(options, FakeMonitor(target_mh, run_dir),
                          agent._Control(target_events, io.StringIO('{"cmd": "commit"}\n')))

        thread = threading.Thread(target=target)
        thread.start()
        while not (run_dir / "channel.sock").exists():
            time.sleep(0.01)
        commands = io.StringIO("".join(json.dumps({"cmd": c}) + "\n"
                                       for c in ("migrate", "stop", "finish", "seal")))
        source_events = io.StringIO()
        options = AgentOptions(role="source", qmp="-", address=address, page_path="mh",
                               limits=PrecopyLimits(downtime_limit=0.001, max_rounds=2))
        agent._source(options, FakeMonitor(source_mh, run_dir, dirty=10),
                      agent._Control(source_events, commands))
        thread.join(30)

        def names(stream):
            return [json.loads(line)["event"] for line in stream.getvalue().splitlines()]

        assert names(target_events) == ["listening", "received", "verified", "committed"]
        source = names(source_events)
        assert source[-4:] == ["sent", "manifest", "committed", "done"]
        assert np.array_equal(source_mh.memory, target_mh.memory)
