"""``plain`` on the emulated platform: vmmig's precopy engine end to end, and its faults.

Real machine processes (``vmmig emu start``), real agent processes, real
sockets.  Every wait is bounded; faults are injected at the first progress
report of a migration that cannot converge quickly (a 1 ms downtime limit),
so they land mid-transfer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from migration_support import (
    SourceWatch,
    interrupt_run,
    migrate_in_process,
    no_leftover_processes,
    socket_closed_port,
)
from vmmig.config import MigrationPlan


VMMIG = [sys.executable, "-m", "vmmig"]


@pytest.fixture
def no_leftovers():
    """Fails the test if a machine or agent process it started outlives it."""
    with no_leftover_processes(b"emu"), no_leftover_processes(b"agent"):
        yield


def run_cli(tmp_path, *args):
    """``vmmig run --platform emu ...``; returns the process result and the JSON report."""
    report_path = tmp_path / "report.json"
    result = subprocess.run([*VMMIG, "run", "--tech", "plain", "--platform", "emu",
                             "--json", str(report_path), *args],
                            capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return result, report


class TestLiveMigration:
    def test_ab_guest_on_two_vcpus_moves_in_several_rounds_intact(self, tmp_path, no_leftovers):
        """The issue's command: 1 GiB, 2 vCPUs, the a-b guest; auto-converge throttles it."""
        result, report = run_cli(tmp_path, "--memory", "1G", "--vcpus", "2", "--workload", "ab",
                                 "--auto-converge")
        assert result.returncode == 0, result.stderr
        assert report["status"] == "completed"
        checks = report["integrity-details"]["checks"]
        assert checks["memory"] == "1.0 GiB identical"
        assert checks["a-b"].startswith("a-b rule holds on 261888 pages")
        assert checks["guest-running"] == "guest running, memory changing"
        assert report["ram"]["dirty-sync-count"] >= 3, "not a live, multi-round migration"
        assert report["ram"]["transferred"] > 1 << 30
        assert report["ram"]["total"] == 1 << 30
        assert 0 < report["downtime"] < report["total-time"]
        assert report["source-vm"] == "retired"
        assert {"transferring-memory", "stopping-source", "transferring-cpu-state",
                "verifying", "finalizing"} <= set(report["phases"])

    def test_dirtying_guest_over_a_unix_socket(self, tmp_path, no_leftovers):
        """dirty:RATE: new pages keep coming while memory moves; the copy is still exact."""
        result, report = run_cli(tmp_path, "--memory", "256M", "--workload", "dirty:64M",
                                 "--transport", "unix")
        assert result.returncode == 0, result.stderr
        checks = report["integrity-details"]["checks"]
        assert checks["memory"] == "256.0 MiB identical"
        assert checks["guest-running"] == "guest running, memory changing"
        assert report["ram"]["dirty-sync-count"] >= 2
        # Memory the guest never touched (below 1 MiB, at least) goes as zero pages.
        assert report["ram"]["duplicate"] > 0

    def test_register_chain_continues_on_the_target(self, tmp_path, no_leftovers):
        """regs: every register arrives, before and after the target resumes."""
        result, report = run_cli(tmp_path, "--memory", "128M", "--workload", "regs")
        assert result.returncode == 0, result.stderr
        checks = report["integrity-details"]["checks"]
        assert checks["register-chain"].startswith("regs chain intact")
        assert checks["register-chain-after-resume"].startswith("regs chain intact")

    def test_round_cap_stops_a_guest_that_never_converges(self, tmp_path, no_leftovers):
        """Without auto-converge a 1 ms limit cannot be met: the cap ends precopy, intact."""
        result, report = run_cli(tmp_path, "--memory", "64M", "--workload", "ab",
                                 "--downtime-limit", "1")
        assert result.returncode == 0, result.stderr
        assert report["ram"]["dirty-sync-count"] == 31  # 30 rounds, then stop-and-copy
        assert report["integrity"] == "ok"


def kill(role):
    """A progress action that SIGKILLs the machine or agent of ``role``."""
    def act(migration, _progress):
        process = {"source machine": migration.source, "target machine": migration.target,
                   "source agent": migration.scratch.get("source-agent"),
                   "target agent": migration.scratch.get("target-agent")}[role]
        os.kill(process.pid, signal.SIGKILL)
    return act


NEVER_CONVERGES = {"platform": "emu", "memory": 128 << 20, "workload": "ab",
                   "downtime_limit": 1}


class TestFaults:
    @pytest.mark.parametrize("role", ["target machine", "target agent", "source agent"])
    def test_a_killed_process_leaves_the_source_running(self, role, no_leftovers):
        """Killed mid-transfer: the migration fails and rolls back; the source guest runs on."""
        report, source = migrate_in_process(MigrationPlan(**NEVER_CONVERGES),
                                            SourceWatch(on_progress=kill(role)))
        assert report.status == "failed"
        assert report.extra["phase-history"][-2:] == ["failing", "rolled-back"]
        assert report.source == "running"
        assert source == (True, "guest running, memory changing")

    def test_a_killed_source_machine_fails_and_leaves_nothing(self, no_leftovers):
        """Nothing can be resumed: the run says so, and the target side is cleaned up."""
        report, source = migrate_in_process(MigrationPlan(**NEVER_CONVERGES),
                                            SourceWatch(on_progress=kill("source machine")))
        assert report.status == "failed"
        assert report.extra["phase-history"][-1] == "failed"
        assert "the source machine is gone" in report.error
        assert source is None

    def test_refusing_destination_leaves_source_running(self, no_leftovers):
        """A destination that refuses connections: clear error, source still running."""
        with socket_closed_port() as port:
            plan = MigrationPlan(platform="emu", memory=64 << 20, workload="ab",
                                 migrate_uri=f"tcp:127.0.0.1:{port}")
            report, source = migrate_in_process(plan, SourceWatch())
        assert report.status == "failed"
        assert f"cannot connect to tcp:127.0.0.1:{port}" in report.error
        assert source == (True, "guest running, memory changing")

    def test_ctrl_c_cancels_and_exits_130(self, tmp_path, no_leftovers):
        """SIGINT mid-transfer: rolled back, source running, exit 130, report written."""
        returncode, stderr, report = interrupt_run(
            ["--platform", "emu", "--memory", "128M", "--workload", "ab", "--downtime-limit", "1",
             "--bandwidth", "64"], tmp_path / "report.json")
        assert returncode == 130, stderr
        assert report["status"] == "cancelled"
        assert report["source-vm"] == "running"
        assert report["phase-history"][-1] == "rolled-back"

    def test_unknown_workload_is_a_clear_error(self, tmp_path, no_leftovers):
        """A workload the emulated guest cannot run: one line naming it, nothing left behind."""
        result, _ = run_cli(tmp_path, "--memory", "64M", "--workload", "fortune")
        assert result.returncode != 0
        assert "fortune" in result.stderr
        assert "Traceback" not in result.stderr
