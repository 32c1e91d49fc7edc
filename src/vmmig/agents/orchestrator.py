"""The orchestrator's side of an agent-driven migration on the emulated platform.

Technologies whose data path is the precopy engine in agent processes
(``plain`` on ``emu``, and the confidential ones, which change only the
page path) share these steps: start the target machine and its agent, run
the source agent's rounds while relaying them to the observers, stop the
source, move the vCPU state, and on failure end the agents and the target
and resume the source.  What each agent is doing is in ``migration.scratch``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import attrs

from vmmig.agents.process import AgentProcess
from vmmig.errors import MigrationFailed, PlatformError
from vmmig.migration import Migration
from vmmig.platforms.emu.machine_process import EmuMachine
from vmmig.report import Progress, RamStats, RoundReport


if TYPE_CHECKING:
    from vmmig.platforms.emu.platform import EmuPlatform


__all__ = ["commit_mh", "end_transfer", "machines", "prepare_target", "resume_source",
           "rollback", "seal_mh", "stop_source", "transfer_cpu_state", "transfer_memory"]

PAGE = 4096
#: Bound on steps that involve no bulk transfer (an agent starting, a state exchange).
STEP_TIMEOUT = 60.0
#: How long a failed source's target agent gets to say why it failed.
TARGET_REASON_TIMEOUT = 2.0


def _platform(migration: Migration) -> EmuPlatform:
    return migration.platform  # type: ignore[no-any-return]


def machines(migration: Migration) -> tuple[EmuMachine, EmuMachine]:
    """The migration's source and target machines."""
    source, target = migration.source, migration.target
    assert isinstance(source, EmuMachine)
    assert isinstance(target, EmuMachine)
    return source, target


def _agent(migration: Migration, role: str) -> AgentProcess:
    agent = migration.scratch.get(f"{role}-agent")
    if not isinstance(agent, AgentProcess):
        raise MigrationFailed(f"no {role} agent is running")
    return agent


async def prepare_target(migration: Migration, page_path: str = "plain") -> None:
    """Start the incoming target machine and both agents, connected to each other.

    :param page_path: the agents' ``--page-path``: ``plain`` or ``mh``.
    """
    platform = _platform(migration)
    migration.scratch["page-path"] = page_path
    migration.target = await platform.launch_target()
    path = ["--page-path", page_path]
    target = await platform.start_agent("target", migration.target,
                                        platform.incoming_address(), path)
    migration.scratch["target-agent"] = target
    listening = await target.expect("listening", STEP_TIMEOUT)
    address = migration.plan.migrate_uri or listening["address"]
    source = await platform.start_agent("source", migration.source, address,
                                        [*_source_options(migration), *path])
    migration.scratch["source-agent"] = source
    await source.expect("ready", STEP_TIMEOUT)


def _source_options(migration: Migration) -> list[str]:
    plan = migration.plan
    return ["--downtime-limit", str(plan.downtime_limit), "--bandwidth", str(plan.bandwidth),
            "--auto-converge" if plan.auto_converge else "--no-auto-converge"]


class _Rounds:
    """Turns the source agent's round events into the report's statistics."""

    def __init__(self, migration: Migration) -> None:
        self.migration = migration
        self.transferred = 0
        self.seconds = 0.0

    @property
    def mbps(self) -> float:
        """Megabits per second over the time pages were moving."""
        return self.transferred * 8 / max(self.seconds, 1e-9) / 1e6

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("event") != "round":
            return
        migration = self.migration
        self.transferred += int(event["sent-bytes"])
        self.seconds += float(event["seconds"])
        seconds = max(float(event["seconds"]), 1e-9)
        remaining = int(event["dirty-pages"]) * PAGE
        rate = int(int(event["dirty-pages"]) / seconds)
        number = int(event["number"])
        migration.ram = RamStats(
            transferred=self.transferred, total=migration.plan.memory, remaining=remaining,
            normal=int(event["normal"]), duplicate=int(event["zero"]),
            normal_bytes=int(event["normal"]) * PAGE, dirty_pages_rate=rate,
            mbps=self.mbps, dirty_sync_count=number)
        migration.round_done(RoundReport(number, self.transferred, remaining, rate))
        migration.progress(Progress(self.transferred, remaining, migration.plan.memory,
                                    migration.ram.mbps, number))


@contextlib.asynccontextmanager
async def _target_explains(migration: Migration) -> AsyncIterator[None]:
    """A source agent that failed may not know why (a broken channel): add the target
    agent's own error, if it reported one that the source's message lacks."""
    try:
        yield
    except MigrationFailed as err:
        target = migration.scratch.get("target-agent")
        if isinstance(target, AgentProcess):
            reason = await target.error(TARGET_REASON_TIMEOUT)
            if reason is not None and reason not in str(err):
                raise MigrationFailed(f"{err}; target agent: {reason}") from err
        raise


async def transfer_memory(migration: Migration) -> None:
    """Let the source agent run its rounds; relay them until it converges (or hits the cap)."""
    agent = _agent(migration, "source")
    started = time.monotonic()
    rounds = _Rounds(migration)
    async with _target_explains(migration):
        await agent.command("migrate")
        await agent.expect("started", STEP_TIMEOUT)
        migration.setup_ms = int((time.monotonic() - started) * 1000)
        converged = await agent.expect("converged", on_event=rounds)
    migration.scratch["rounds"] = rounds
    migration.log.info("precopy ended: %s", converged["reason"])


async def stop_source(migration: Migration) -> None:
    """Pause the source guest and send what is still dirty."""
    agent = _agent(migration, "source")
    migration.scratch["stopping"] = True
    async with _target_explains(migration):
        await agent.command("stop")
        stopped = await agent.expect("stopped", STEP_TIMEOUT)
    rounds: _Rounds = migration.scratch["rounds"]
    rounds.seconds += float(stopped["seconds"])


async def transfer_cpu_state(migration: Migration) -> None:
    """Send the vCPU state; done when both agents say the target holds the whole guest.

    On the MH page path both agents stay, for :func:`seal_mh` and :func:`commit_mh`.
    """
    source, target = _agent(migration, "source"), _agent(migration, "target")
    async with _target_explains(migration):
        await source.command("finish")
        sent = await source.expect("sent", STEP_TIMEOUT)
    await target.expect("received", STEP_TIMEOUT)
    rounds: _Rounds = migration.scratch["rounds"]
    migration.downtime_ms = int(float(sent["downtime"]) * 1000)
    memory_ms = int(float(sent["downtime-memory"]) * 1000)
    migration.downtime_parts = {"memory": memory_ms,
                                "cpu-state": migration.downtime_ms - memory_ms}
    migration.scratch["state-moved-at"] = time.monotonic()
    rounds.transferred = int(sent["sent-bytes"])
    migration.ram = attrs.evolve(
        migration.ram, transferred=rounds.transferred, remaining=0,
        normal=int(sent["normal"]), duplicate=int(sent["zero"]),
        normal_bytes=int(sent["normal"]) * PAGE, mbps=rounds.mbps,
        # QEMU counts the final sync of stop-and-copy as a pass too.
        dirty_sync_count=migration.ram.dirty_sync_count + 1)
    if migration.scratch["page-path"] != "mh":
        await source.expect("done", STEP_TIMEOUT)
        await _close_agents(migration)


async def seal_mh(migration: Migration) -> None:
    """The source's MH seals its manifest; the target's MH checks it against what it holds.

    From here the source resumes only with the target MH's abort token,
    which the target agent sends when it is told anything but ``commit``.
    """
    source, target = _agent(migration, "source"), _agent(migration, "target")
    migration.scratch["sealed"] = True
    async with _target_explains(migration):
        await source.command("seal")
        await source.expect("manifest", STEP_TIMEOUT)
    await target.expect("verified", STEP_TIMEOUT)
    migration.record_check("memory", "the target's MH verified the source MH's sealed "
                           "manifest: every page at its final version, the keyed digest of "
                           "all guest RAM equal")


async def commit_mh(migration: Migration) -> None:
    """The target's MH commits (the migration's point of no return); its receipt retires
    the source's."""
    source, target = _agent(migration, "source"), _agent(migration, "target")
    await target.command("commit")
    await target.expect("committed", STEP_TIMEOUT)
    migration.commit()
    # The guest was down while the MHs checked and committed: that is downtime too.
    commit_ms = int((time.monotonic() - migration.scratch["state-moved-at"]) * 1000)
    migration.downtime_parts["commit"] = commit_ms
    if migration.downtime_ms is not None:
        migration.downtime_ms += commit_ms
    await source.expect("committed", STEP_TIMEOUT)
    migration.record_check("source-retired", "the target's receipt retired the source's MH")
    await source.expect("done", STEP_TIMEOUT)
    await _close_agents(migration)


async def _close_agents(migration: Migration) -> None:
    for role in ("source", "target"):
        await _agent(migration, role).close()


async def rollback(migration: Migration, reason: str) -> None:
    """End the agents and the target; make sure the source guest runs, unthrottled."""
    await end_transfer(migration, reason)
    await resume_source(migration)


async def end_transfer(migration: Migration, reason: str) -> None:
    """Rollback's first half: the agents and the target machine ended."""
    migration.log.info("rolling back: %s", reason)
    # The source, told to stop, tells the target; but a sealed source waits on the
    # target, whose MH must abort first to hand it its abort token.
    for role in ("target", "source") if migration.scratch.get("sealed") else ("source", "target"):
        agent = migration.scratch.pop(f"{role}-agent", None)
        if isinstance(agent, AgentProcess):
            await agent.close()
    if migration.target is not None:
        await migration.target.shutdown()


async def resume_source(migration: Migration) -> None:
    """Rollback's second half: the source's dirty log and throttle off, its guest running.

    :raises MigrationFailed: the source machine is gone.
    """
    source: EmuMachine = migration.source
    if source.exited:
        raise MigrationFailed(f"the source machine is gone ({source.returncode}); "
                              "nothing to resume")
    # The agent may have died before cleaning up after itself.
    with contextlib.suppress(PlatformError):
        await source.execute("x-dirty-log-stop")
    await source.execute("x-cpu-throttle", {"percentage": 0})
    if await source.status() != "running":
        await source.cont()
