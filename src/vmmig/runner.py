"""The driver: runs one migration by feeding the state machine and doing its I/O.

This is the only place that turns the machine's actions into hook calls,
maps their outcomes to events, applies the plan's timeout, and turns Ctrl-C
into a cancel that rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from vmmig.config import MigrationPlan, requested_features
from vmmig.core import events as ev
from vmmig.core.actions import Action, Finish, RollBack, RunStep
from vmmig.core.machine import MigrationMachine
from vmmig.core.phases import Phase
from vmmig.errors import MigrationCancelled, VmmigError
from vmmig.integrity import human_size
from vmmig.migration import Migration
from vmmig.plugin_host import PluginHost, TechnologyHooks
from vmmig.report import MigrationReport, Status


__all__ = ["PlatformOpener", "run_migration"]

#: Opens a platform for a plan: an async context manager that cleans up after itself.
PlatformOpener = Callable[[MigrationPlan], AbstractAsyncContextManager[Any]]


def open_platform(plan: MigrationPlan) -> AbstractAsyncContextManager[Any]:
    """The platform the plan names."""
    if plan.platform == "qemu":
        from vmmig.platforms.qemu.platform import QemuPlatform  # noqa: PLC0415 (heavy, optional)

        return QemuPlatform.open(plan)
    from vmmig.platforms.emu.platform import EmuPlatform  # noqa: PLC0415 (heavy, optional)

    return EmuPlatform.open(plan)


class _Driver:
    """Feeds one migration's machine; one instance per run."""

    def __init__(self, migration: Migration, hooks: TechnologyHooks, host: PluginHost,
                 announce: Callable[[str], None]) -> None:
        self.migration = migration
        self.announce = announce
        self.hooks = hooks
        self.host = host
        self.machine = MigrationMachine()
        self.phase_started = time.monotonic()
        self.phase_ms: dict[str, int] = {}
        self.cancelled = False
        self.step: asyncio.Task[None] | None = None

    def feed(self, event: ev.Event) -> Action | None:
        old = self.machine.phase
        action = self.machine.receive(event)
        if self.machine.phase is not old:
            now = time.monotonic()
            if old is not Phase.IDLE:
                self.phase_ms[old.value] = int((now - self.phase_started) * 1000)
            self.phase_started = now
            self.announce(f"phase {self.machine.phase.value}")
            self.host.phase_changed(self.migration, old, self.machine.phase)
        return action

    def commit(self) -> None:
        """The technology passed its commit point; no new action follows."""
        self.feed(ev.Committed())

    def cancel(self) -> None:
        """Ctrl-C: cancel the running step; the loop rolls back."""
        if self.machine.committed:
            self.announce("interrupt ignored: the target has already committed")
        elif not self.cancelled:
            self.announce("interrupted: cancelling the migration")
            self.cancelled = True
            if self.step is not None:
                self.step.cancel()

    async def run(self, deadline: float | None) -> Finish:
        action = self.feed(ev.Start())
        while not isinstance(action, Finish):
            if isinstance(action, RunStep):
                action = self.feed(await self._run_step(action.phase, deadline))
            elif isinstance(action, RollBack):
                action = self.feed(await self._roll_back(action.reason))
            else:  # pragma: no cover - the machine returns None only for events we never feed
                raise AssertionError(f"unexpected action {action!r}")
        return action

    async def _run_step(self, phase: Phase, deadline: float | None) -> ev.Event:  # noqa: PLR0911 (one return per outcome)
        if self.cancelled:
            return ev.CancelRequested()
        failures_before = len(self.migration.failures)
        self.step = asyncio.create_task(self.hooks.run_step(phase, self.migration))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(self.step), timeout)
        except TimeoutError:
            self.step.cancel()
            with contextlib.suppress(BaseException):
                await self.step
            return ev.StepFailed(self._timeout_reason(phase))
        except asyncio.CancelledError:
            if not self.cancelled:
                raise
            return ev.CancelRequested()
        except VmmigError as err:
            return ev.StepFailed(str(err))
        except Exception as err:  # a plugin bug: report it as a failure, roll back
            return ev.StepFailed(f"{type(err).__name__} in {phase.value}: {err}")
        finally:
            self.step = None
        new_failures = self.migration.failures[failures_before:]
        if new_failures:
            return ev.StepFailed("integrity check failed: " + "; ".join(new_failures))
        return ev.StepDone()

    def _timeout_reason(self, phase: Phase) -> str:
        reason = f"timed out after {self.migration.plan.timeout:g} s in phase {phase.value}"
        ram = self.migration.ram
        if phase is Phase.TRANSFERRING_MEMORY and ram.dirty_sync_count > 1:
            reason += (f" without converging ({ram.dirty_sync_count} passes, "
                       f"{human_size(ram.remaining)} still dirty, {ram.mbps:.0f} Mbit/s): "
                       "the guest dirties memory faster than it can be sent; try "
                       "--auto-converge, a larger --downtime-limit or more --bandwidth")
        return reason

    async def _roll_back(self, reason: str) -> ev.Event:
        try:
            await self.hooks.rollback(self.migration, reason)
        except Exception as err:
            return ev.RollbackFailed(f"rollback failed: {err}")
        return ev.RollbackDone()


class _Interrupts:
    """Ctrl-C and SIGTERM: cancel the migration if one runs, else the whole run."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.driver: _Driver | None = None
        self.received: signal.Signals | None = None
        self._task = asyncio.current_task()

    def __call__(self, signum: signal.Signals) -> None:
        self.received = signum
        if self.driver is not None:
            self.driver.cancel()
        elif self._task is not None:
            # Nothing to roll back yet: unwind, which cleans up every process.
            self._task.cancel()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        try:
            for signum in self.SIGNALS:
                loop.add_signal_handler(signum, self, signum)
        except (NotImplementedError, RuntimeError):  # not the main thread: no signal handling
            yield
            return
        try:
            yield
        finally:
            for signum in self.SIGNALS:
                loop.remove_signal_handler(signum)


async def run_migration(plan: MigrationPlan, host: PluginHost, *,
                        opener: PlatformOpener = open_platform,
                        announce: Callable[[str], None] = lambda _line: None) -> MigrationReport:
    """Run one migration as ``vmmig run`` does: source VM, migration, checks, report.

    :param plan: the validated plan.
    :param host: the plugin host (technology selected from ``plan.tech``).
    :param opener: opens the platform (tests substitute their own).
    :param announce: receives one-line status messages for the user.
    :raises VmmigError: when the technology or platform cannot run; nothing
        was started then.
    """
    host.check_host(plan)
    hooks = host.select(plan.tech, plan.platform, requested_features(plan))
    interrupts = _Interrupts()
    with interrupts.installed():
        try:
            return await _run(plan, host=host, hooks=hooks, opener=opener, announce=announce,
                              interrupts=interrupts)
        except asyncio.CancelledError:
            if interrupts.received is None:
                raise
            raise MigrationCancelled(f"interrupted ({interrupts.received.name}) before the "
                                     "migration started; nothing was migrated",
                                     interrupts.received) from None


async def _run(plan: MigrationPlan, *, host: PluginHost, hooks: TechnologyHooks,
               opener: PlatformOpener, announce: Callable[[str], None],
               interrupts: _Interrupts) -> MigrationReport:
    async with opener(plan) as platform:
        announce(f"platform {plan.platform}: {platform.describe()}")
        source = await platform.launch_source()
        announce(f"source VM running the {plan.workload!r} workload")
        migration = Migration(plan, platform, source=source)
        driver = _Driver(migration, hooks, host, announce)
        migration.on_round = lambda r: host.round_done(migration, r)
        migration.on_progress = lambda p: host.progress(migration, p)
        migration.on_commit = driver.commit
        started = time.monotonic()
        deadline = started + plan.timeout if plan.timeout else None
        interrupts.driver = driver
        finish = await driver.run(deadline)
        total_ms = int((time.monotonic() - started) * 1000)
    status: Status = ("completed" if finish.phase is Phase.COMPLETED
                      else "cancelled" if driver.cancelled else "failed")
    return MigrationReport(
        status=status,
        technology=plan.tech,
        platform=plan.platform,
        total_time=total_ms,
        downtime=migration.downtime_ms,
        downtime_parts=migration.downtime_parts,
        setup_time=migration.setup_ms or 0,
        ram=migration.ram,
        phases=driver.phase_ms,
        integrity=migration.integrity if migration.checks else None,
        error=finish.reason,
        source="running" if finish.phase is Phase.ROLLED_BACK else
        ("retired" if status == "completed" else "unknown"),
        extra={"phase-history": [p.value for p in driver.machine.history],
               **({"cancelled-by": interrupts.received.name} if interrupts.received else {})},
    )
