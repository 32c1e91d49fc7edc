"""The precopy engine between two real emulated machines (processes), over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmmig.agents.engine import run_source, run_target
from vmmig.channel import Channel
from vmmig.core.precopy import PrecopyLimits, Reason
from vmmig.guests.ab_check import ab_passes, check_ab
from vmmig.integrity import compare_ram_files


@contextlib.contextmanager
def emu_machine(run_dir: Path, name: str, *args: str):
    """A `vmmig emu start` process; yields its QMP socket once it listens."""
    qmp = run_dir / f"{name}.qmp"
    process = subprocess.Popen([sys.executable, "-m", "vmmig", "emu", "start", "--name", name,
                                "--qmp", str(qmp), *args], stderr=subprocess.DEVNULL)
    with process:
        try:
            deadline = time.monotonic() + 30
            while not qmp.exists():
                assert process.poll() is None, f"machine {name} exited"
                assert time.monotonic() < deadline, f"machine {name} did not open QMP"
                time.sleep(0.02)
            yield qmp
        finally:
            process.kill()


@contextlib.contextmanager
def connected(qmp: Path):
    """A synchronous QMP client; each thread needs its own (it runs its own event loop)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # the legacy client runs on this thread's loop
    monitor = QEMUMonitorProtocol(str(qmp))
    monitor.connect()
    try:
        yield monitor
    finally:
        monitor.close()
        asyncio.set_event_loop(None)
        loop.close()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def machines(tmp_path):
    with emu_machine(tmp_path, "src", "--memory", "64M", "--workload", "ab") as source, \
            emu_machine(tmp_path, "dst", "--memory", "64M", "--incoming") as target:
        yield source, target, tmp_path


def migrate(source, target_qmp, limits):
    left, right = socket.socketpair()
    results: dict[str, object] = {}

    def receive():
        try:
            with connected(target_qmp) as target, Channel(right) as channel:
                results["written"] = run_target(target, channel)
        except BaseException as err:
            results["error"] = err

    thread = threading.Thread(target=receive)
    thread.start()
    rounds = []
    with Channel(left) as channel:
        result = run_source(source, channel, limits, on_round=rounds.append)
    thread.join(30)
    return result, rounds, results


class TestPrecopy:
    def test_a_dirtying_guest_moves_in_several_rounds_and_continues_on_the_target(self, machines):
        """Memory identical, a-b rule intact, vCPU continues on the target; more than one round."""
        source_qmp, target_qmp, run_dir = machines
        with connected(source_qmp) as source:
            ram = Path(source.cmd("x-query-memory")["ram-path"])
            wait_for(lambda: ab_passes(ram.read_bytes()[:4096]) >= 1)
            result, rounds, results = migrate(source, target_qmp,
                                              PrecopyLimits(downtime_limit=0.001, max_rounds=3))
            assert source.cmd("query-status")["status"] == "paused"
        assert "error" not in results, results
        assert len(result.rounds) >= 2
        assert rounds[-1].reason in {Reason.CONVERGED, Reason.ROUND_CAP}
        scan = compare_ram_files(ram, run_dir / "dst.ram")
        assert scan.comparison.identical, scan.comparison.describe()
        assert check_ab(ram.read_bytes()).ok
        passes = ab_passes((run_dir / "dst.ram").read_bytes()[:4096])
        with connected(target_qmp) as target:
            target.cmd("cont")
            wait_for(lambda: ab_passes((run_dir / "dst.ram").read_bytes()[:4096]) > passes)
            target.cmd("stop")
        assert check_ab((run_dir / "dst.ram").read_bytes()).ok

    def test_zero_pages_are_elided(self, machines):
        """The untouched part of RAM goes as zero pages: counted, not sent in full."""
        source_qmp, target_qmp, _ = machines
        with connected(source_qmp) as source:
            result, _, results = migrate(source, target_qmp, PrecopyLimits(downtime_limit=0.3))
        assert "error" not in results, results
        assert result.zero > 0
        assert result.normal + result.zero >= result.total_pages
