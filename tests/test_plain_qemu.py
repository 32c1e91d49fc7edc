"""``plain`` on real QEMU: live migration end to end, and the faults it must survive.

These tests start real QEMU processes (KVM when /dev/kvm is usable, TCG
otherwise) and are never skipped.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
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
from vmmig.platforms.qemu.host import kvm_status


pytestmark = pytest.mark.qemu

VMMIG = [sys.executable, "-m", "vmmig"]


@pytest.fixture
def no_leftover_qemu():
    """Fails the test if a QEMU process it started outlives it."""
    with no_leftover_processes(b"qemu-system"):
        yield


class TestLiveMigration:
    def test_dirtying_guest_migrates_live_with_integrity(self, tmp_path, no_leftover_qemu):
        """The QEMU command the README names: a dirtying 1 GiB guest moves in several passes,
        intact."""
        report_path = tmp_path / "report.json"
        # Under TCG the guest dirties memory faster than loopback carries it:
        # only throttling converges there (see the runner's timeout hint).
        converge = [] if kvm_status()[0] else ["--auto-converge"]
        result = subprocess.run(
            [*VMMIG, "run", "--tech", "plain", "--platform", "qemu", "--memory", "1G",
             "--workload", "ab", "--json", str(report_path), *converge],
            capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
        report = json.loads(report_path.read_text())
        assert report["status"] == "completed"
        assert report["integrity"] == "ok"
        checks = report["integrity-details"]["checks"]
        assert checks["memory"] == "1.0 GiB identical"
        assert checks["a-b"].startswith("a-b rule holds on 261888 pages")
        assert checks["guest-running"] == "guest running, memory changing"
        assert report["ram"]["dirty-sync-count"] >= 2, "not a live, multi-pass migration"
        for key in ("transferred", "total", "remaining", "normal", "duplicate",
                    "dirty-pages-rate", "mbps", "dirty-sync-count"):
            assert key in report["ram"]
        assert report["ram"]["total"] >= 1 << 30
        assert report["total-time"] > 0
        assert report["downtime"] > 0
        assert report["setup-time"] >= 0
        assert set(report["phases"]) >= {"preparing-target", "transferring-memory",
                                          "verifying", "finalizing"}
        assert "integrity" in result.stdout
        assert "a-b" in result.stdout

    @pytest.mark.parametrize("transport", ["unix", "tcp"])
    def test_idle_guest_over_each_transport(self, transport, no_leftover_qemu):
        """An idle guest migrates over a Unix socket and over TCP; zero pages are elided."""
        plan = MigrationPlan(platform="qemu", memory=128 << 20, workload="idle",
                             transport=transport)
        report, _ = migrate_in_process(plan, SourceWatch())
        assert report.status == "completed", report.error
        assert report.integrity.ok
        assert report.ram.duplicate > report.ram.normal

    def test_auto_converge_and_multifd_are_applied(self, no_leftover_qemu):
        """auto-converge and multifd channels from the plan reach QEMU, and it still completes."""
        seen = {}

        def inspect_params(migration, progress):
            async def query():
                caps = await migration.source.execute("query-migrate-capabilities")
                params = await migration.source.execute("query-migrate-parameters")
                seen["caps"] = {c["capability"]: c["state"] for c in caps}
                seen["params"] = params
            asyncio.get_running_loop().create_task(query())

        plan = MigrationPlan(platform="qemu", memory=256 << 20, workload="ab",
                             auto_converge=True, multifd_channels=2, downtime_limit=500)
        report, _ = migrate_in_process(plan, SourceWatch(on_progress=inspect_params))
        assert report.status == "completed", report.error
        assert seen["caps"]["auto-converge"] is True
        assert seen["caps"]["multifd"] is True
        assert seen["params"]["multifd-channels"] == 2
        assert seen["params"]["downtime-limit"] == 500


class TestFaults:
    def test_refusing_destination_leaves_source_running(self, tmp_path, no_leftover_qemu):
        """A destination that refuses connections: clear error, source still running."""
        with socket_closed_port() as port:
            plan = MigrationPlan(platform="qemu", memory=128 << 20, workload="ab",
                                 migrate_uri=f"tcp:127.0.0.1:{port}")
            report, source = migrate_in_process(plan, SourceWatch())
        assert report.status == "failed"
        assert "Connection refused" in report.error
        assert report.extra["phase-history"][-1] == "rolled-back"
        assert source == (True, "guest running, memory changing")

    def test_killed_target_leaves_source_running(self, no_leftover_qemu):
        """The target QEMU killed mid-transfer: the migration fails, the source guest runs on."""

        def kill_target(migration, progress):
            os.kill(migration.target.pid, signal.SIGKILL)

        plan = MigrationPlan(platform="qemu", memory=512 << 20, workload="ab", bandwidth=64)
        report, source = migrate_in_process(plan, SourceWatch(on_progress=kill_target))
        assert report.status == "failed"
        assert report.extra["phase-history"][-2:] == ["failing", "rolled-back"]
        assert source == (True, "guest running, memory changing")

    def test_ctrl_c_cancels_and_exits_130(self, tmp_path, no_leftover_qemu):
        """SIGINT during transfer: migrate_cancel, source running, target gone, exit 130."""
        returncode, stderr, report = interrupt_run(
            ["--memory", "512M", "--workload", "ab", "--bandwidth", "32"],
            tmp_path / "report.json")
        assert returncode == 130, stderr
        assert report["status"] == "cancelled"
        assert report["source-vm"] == "running"
        assert report["phase-history"][-1] == "rolled-back"

    def test_missing_qemu_is_a_clear_error(self, tmp_path):
        """Without QEMU on PATH, vmmig says so in one line and exits 1, touching nothing."""
        env = {**os.environ, "PATH": str(tmp_path)}
        result = subprocess.run([*VMMIG, "run", "--memory", "128M"], env=env,
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        assert "qemu-system-x86_64 not found" in result.stderr
        assert "Traceback" not in result.stderr

    @pytest.mark.skipif(os.geteuid() != 0, reason="hiding /dev/kvm needs a private mount (root)")
    @pytest.mark.parametrize("accel", ["auto", "kvm"])
    def test_unusable_kvm_falls_back_to_tcg_or_stops(self, accel, tmp_path, no_leftover_qemu):
        """With /dev/kvm unusable, auto says so and uses TCG; an explicit kvm stops, naming why."""
        hide_kvm = ("if [ -e /dev/kvm ]; then mount --bind /dev/null /dev/kvm || exit 99; fi; "
                    "exec \"$@\"")
        result = subprocess.run(
            ["unshare", "--mount", "sh", "-c", hide_kvm, "sh", *VMMIG, "run", "--memory", "64M",
             "--workload", "idle", "--accel", accel],
            capture_output=True, text=True, timeout=300, check=False)
        if accel == "auto":
            assert result.returncode == 0, result.stderr
            assert "TCG (/dev/kvm: " in result.stderr
        else:
            assert result.returncode == 1, result.stderr
            assert "/dev/kvm: " in result.stderr
            assert "Traceback" not in result.stderr

    def test_bad_plan_exits_2_with_one_line(self, tmp_path):
        """A bad plan field: one line naming it, exit status 2."""
        plan = tmp_path / "plan.toml"
        plan.write_text("downtime-limit = -5\n")
        result = subprocess.run([*VMMIG, "run", "--config", str(plan)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2
        assert result.stderr.strip() == (f"vmmig: error: {plan}: downtime-limit: "
                                         "must be at least 1 ms, got -5")
