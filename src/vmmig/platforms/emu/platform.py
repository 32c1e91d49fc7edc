"""The ``emu`` platform as the runner and the technologies see it.

It owns the machine and agent processes of one ``vmmig run``: machines go
in a :class:`~vmmig.platforms.fleet.Fleet` (one work directory on tmpfs,
every process ended on every way out), agents are started per migration by
the technology and logged into the same directory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from vmmig.agents.process import AgentProcess
from vmmig.config import MigrationPlan
from vmmig.platforms.emu.dirtylog import probe
from vmmig.platforms.emu.machine_process import EmuMachine, EmuMachineSpec
from vmmig.platforms.fleet import Fleet
from vmmig.workloads import wait_workload_ready


__all__ = ["EmuPlatform"]


class EmuPlatform:
    """The built-in emulated confidential platform: one process per VM, Unicorn vCPUs."""

    name = "emu"

    def __init__(self, plan: MigrationPlan, fleet: Fleet) -> None:
        self.plan = plan
        self.fleet = fleet

    @classmethod
    @asynccontextmanager
    async def open(cls, plan: MigrationPlan) -> AsyncIterator[EmuPlatform]:
        """Clean up every machine and the work directory on exit."""
        async with Fleet() as fleet:
            yield cls(plan, fleet)

    def describe(self) -> str:
        """The dirty-log method this host offers, e.g. ``dirty log: userfaultfd-wp ...``."""
        found = probe()
        method = "userfaultfd-wp + PAGEMAP_SCAN" if found.available else "content-compare"
        return f"emulated machines (Unicorn vCPUs), dirty log: {method}"

    def _spec(self, name: str, *, incoming: bool = False) -> EmuMachineSpec:
        return EmuMachineSpec(name=name, memory=self.plan.memory, vcpus=self.plan.vcpus,
                              tech=self.plan.tech, workload=self.plan.workload,
                              incoming=incoming)

    async def _launch(self, spec: EmuMachineSpec) -> EmuMachine:
        return await self.fleet.launch(spec.name,
                                       lambda workdir: EmuMachine.launch(spec, workdir))

    async def launch_source(self) -> EmuMachine:
        """Start the workload's guest and wait until its memory obeys the workload's rule."""
        machine = await self._launch(self._spec("source"))
        with machine.map_ram() as ram:
            await wait_workload_ready(self.plan.workload, ram)
        return machine

    async def launch_target(self) -> EmuMachine:
        """Start a target waiting for the guest's state (``--incoming``)."""
        return await self._launch(self._spec("target", incoming=True))

    def incoming_address(self) -> str:
        """Where the target agent listens: the plan's transport, an ephemeral port or socket."""
        if self.plan.transport == "unix":
            return f"unix:{self.fleet.workdir / 'migration.sock'}"
        return f"tcp:{self.plan.listen}:0"

    async def start_agent(self, role: str, machine: EmuMachine, address: str,
                          options: Sequence[str] = ()) -> AgentProcess:
        """Start the agent for ``machine``; its output goes to ``<role>-agent.log``."""
        log: Path = self.fleet.workdir / f"{role}-agent.log"
        return await AgentProcess.start(role, machine.qmp_path, address, log, options)
