"""The driver: phases run in order, failures and cancels roll back, the report is filled.

A scripted in-process technology stands in for a real one here so that every
path of the driver can be forced; real QEMU runs are in test_plain_qemu.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.core.phases import Phase
from vmmig.errors import MigrationCancelled
from vmmig.plugin_host import PluginHost
from vmmig.report import RamStats
from vmmig.runner import run_migration
from vmmig.technology import Technology


class ScriptedTech:
    """A technology whose steps record themselves and misbehave on request."""

    def __init__(self, *, fail_in=None, hang_in=None, bad_check=False, rollback_fails=False):
        self.calls: list[str] = []
        self.fail_in, self.hang_in = fail_in, hang_in
        self.bad_check, self.rollback_fails = bad_check, rollback_fails
        self.hanging = asyncio.Event()

    async def _step(self, name, migration):
        self.calls.append(name)
        if name == self.hang_in:
            self.hanging.set()
            await asyncio.Event().wait()
        if name == self.fail_in:
            raise RuntimeError(f"{name} exploded")

    @hookimpl
    def vmmig_technology(self):
        return Technology(name="scripted", summary="test double", platforms=("emu",))

    @hookimpl
    def vmmig_prepare_target(self, migration):
        migration.target = "target-vm"
        return self._step("prepare_target", migration)

    @hookimpl
    def vmmig_transfer_memory(self, migration):
        return self._step("transfer_memory", migration)

    @hookimpl
    def vmmig_verify_target(self, migration):
        async def verify():
            await self._step("verify_target", migration)
            migration.record_check("memory", "differs" if self.bad_check else "identical",
                                   ok=not self.bad_check)
        return verify()

    @hookimpl
    def vmmig_finalize(self, migration):
        async def finalize():
            migration.commit()
            await self._step("finalize", migration)
        return finalize()

    @hookimpl
    def vmmig_rollback(self, migration, reason):
        async def rollback():
            self.calls.append(f"rollback: {reason}")
            if self.rollback_fails:
                raise RuntimeError("source vanished")
        return rollback()


class Recorder:
    def __init__(self):
        self.phases: list[tuple[Phase, Phase]] = []

    @hookimpl
    def vmmig_phase_changed(self, migration, old, new):
        self.phases.append((old, new))


class FakePlatform:
    def __init__(self, boot_hangs=False):
        self.boot_hangs = boot_hangs
        self.booting = asyncio.Event()
        self.closed = False

    def describe(self):
        return "in-process"

    async def launch_source(self):
        self.booting.set()
        if self.boot_hangs:
            await asyncio.Event().wait()
        return "source-vm"


def fake_platform(platform=None):
    @contextlib.asynccontextmanager
    async def opener(plan):
        nonlocal platform
        platform = platform or FakePlatform()
        try:
            yield platform
        finally:
            platform.closed = True
    return opener


def run(tech, *, timeout=30.0, during=None, platform=None):
    host = PluginHost(builtins=(), entry_points=False)
    host.pm.register(tech, name="scripted")
    recorder = Recorder()
    host.pm.register(recorder, name="recorder")
    plan = MigrationPlan(tech="scripted", platform="emu", timeout=timeout)

    async def main():
        task = asyncio.create_task(run_migration(plan, host, opener=fake_platform(platform)))
        if during is not None:
            await during(tech, task)
        return await task

    return asyncio.run(main()), recorder


class TestHappyPath:
    def test_steps_run_in_phase_order_and_optional_ones_are_skipped(self):
        """Required steps run in order; steps the technology leaves out are no-ops."""
        tech = ScriptedTech()
        report, recorder = run(tech)
        assert tech.calls == ["prepare_target", "transfer_memory", "verify_target", "finalize"]
        assert report.status == "completed"
        assert [new for _, new in recorder.phases][-1] is Phase.COMPLETED
        assert report.integrity is not None
        assert report.integrity.ok

    def test_report_has_a_timing_for_every_phase_passed(self):
        """The report times each phase that was entered."""
        report, _ = run(ScriptedTech())
        assert set(report.phases) >= {"preparing-target", "transferring-memory", "verifying",
                                      "finalizing"}
        assert all(ms >= 0 for ms in report.phases.values())


class TestFailures:
    @pytest.mark.parametrize("step", ["prepare_target", "transfer_memory", "verify_target"])
    def test_failure_before_commit_rolls_back(self, step):
        """A step that raises before commit rolls back with its reason; no later step runs."""
        tech = ScriptedTech(fail_in=step)
        report, _ = run(tech)
        assert report.status == "failed"
        assert tech.calls[-1] == f"rollback: RuntimeError in {report.error.split(' in ')[1]}"
        assert "exploded" in report.error
        assert "finalize" not in tech.calls
        assert report.source == "running"

    def test_failed_integrity_check_rolls_back(self):
        """A failed integrity check fails the verifying phase; the source is resumed."""
        tech = ScriptedTech(bad_check=True)
        report, _ = run(tech)
        assert report.status == "failed"
        assert "integrity check failed: memory: differs" in report.error
        assert tech.calls[-1].startswith("rollback:")
        assert not report.integrity.ok

    def test_failure_after_commit_does_not_roll_back(self):
        """A failure after commit ends failed without rollback (no fork of the guest)."""
        tech = ScriptedTech(fail_in="finalize")
        report, _ = run(tech)
        assert report.status == "failed"
        assert not any(call.startswith("rollback") for call in tech.calls)

    def test_failed_rollback_is_reported(self):
        """When rollback itself fails the migration ends failed and says the source is unknown."""
        report, _ = run(ScriptedTech(fail_in="transfer_memory", rollback_fails=True))
        assert report.status == "failed"
        assert report.source == "unknown"
        assert report.extra["phase-history"][-1] == "failed"

    def test_timeout_cancels_the_step_and_rolls_back(self):
        """A step that exceeds the plan's timeout is cancelled and rolled back."""
        tech = ScriptedTech(hang_in="transfer_memory")
        report, _ = run(tech, timeout=0.2)
        assert report.status == "failed"
        assert "timed out after 0.2 s in phase transferring-memory" in report.error
        assert tech.calls[-1].startswith("rollback: timed out")


class TestConvergenceHint:
    def test_timeout_while_not_converging_says_what_to_try(self):
        """A timeout after several passes names the passes and the options that help."""

        class NeverConverges(ScriptedTech):
            @hookimpl
            def vmmig_transfer_memory(self, migration):
                migration.ram = RamStats(remaining=512 << 20, dirty_sync_count=40, mbps=9000.0)
                return self._step("transfer_memory", migration)

        report, _ = run(NeverConverges(hang_in="transfer_memory"), timeout=0.2)
        assert ("without converging (40 passes, 512.0 MiB still dirty, 9000 Mbit/s)"
                in report.error)
        assert "--auto-converge" in report.error


class TestCancel:
    def test_sigint_cancels_the_running_step_and_rolls_back(self):
        """Ctrl-C (SIGINT) during a step cancels it, rolls back, and reports 'cancelled'."""
        async def interrupt(tech, task):
            await asyncio.wait_for(tech.hanging.wait(), 10)
            os.kill(os.getpid(), signal.SIGINT)

        tech = ScriptedTech(hang_in="transfer_memory")
        report, _ = run(tech, during=interrupt)
        assert report.status == "cancelled"
        assert tech.calls[-1] == "rollback: cancelled"
        assert report.source == "running"
        assert report.extra["cancelled-by"] == "SIGINT"

    def test_sigterm_before_the_migration_unwinds_and_cleans_up(self):
        """SIGTERM while the source boots: nothing to roll back; the platform is closed."""
        platform = FakePlatform(boot_hangs=True)

        async def terminate(tech, task):
            await asyncio.wait_for(platform.booting.wait(), 10)
            os.kill(os.getpid(), signal.SIGTERM)

        tech = ScriptedTech()
        with pytest.raises(MigrationCancelled, match="SIGTERM") as info:
            run(tech, during=terminate, platform=platform)
        assert info.value.signum == signal.SIGTERM
        assert platform.closed
        assert tech.calls == []
