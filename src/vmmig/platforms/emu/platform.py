"""The ``emu`` platform as the runner and the technologies see it.

It owns the machine and agent processes of one ``vmmig run``: machines go
in a :class:`~vmmig.platforms.fleet.Fleet` (one work directory on tmpfs,
every process ended on every way out), agents are started per migration by
the technology and logged into the same directory.

For ``sev`` and ``sev-es`` the run is also a small deployment: the emulated
AMD root (:func:`~.sev_hosts.default_amd_root`), a source and a target
host, and the guest owner, which attests every VM before it gets the
guest's master secret (:mod:`.attested_launch`); ``attestations`` keeps
what it accepted.  The owner is the plan's ``owner``: by default in process
with its state in the work directory; a state directory keeps it across
runs; an address reaches ``vmmig owner serve``.  An owner in process
records the guest's two expected launches (boot and migration target) on
first use, as its tenant would; a served one must have them already
(``vmmig owner expect``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs

from vmmig.agents.process import AgentProcess
from vmmig.config import MigrationPlan
from vmmig.owner import GuestOwner, OwnerClient, TrustAnchor, expected_launch_for
from vmmig.owner.expected import OWNER_TECHS
from vmmig.platforms.emu.attested_launch import Attestation, AttestedLauncher
from vmmig.platforms.emu.dirtylog import probe
from vmmig.platforms.emu.machine_process import EmuMachine, EmuMachineSpec
from vmmig.platforms.emu.sev_hosts import EmulatedHosts, default_amd_root
from vmmig.platforms.fleet import Fleet
from vmmig.workloads import wait_workload_ready


__all__ = ["EmuPlatform"]


class EmuPlatform:
    """The built-in emulated confidential platform: one process per VM, Unicorn vCPUs."""

    name = "emu"

    #: The guest's id at its owner.
    GUEST = "guest"

    def __init__(self, plan: MigrationPlan, fleet: Fleet,
                 launcher: AttestedLauncher | None = None) -> None:
        self.plan = plan
        self.fleet = fleet
        self.launcher = launcher
        #: What the owner accepted, by role (``source``, ``target``).
        self.attestations: dict[str, Attestation] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, plan: MigrationPlan) -> AsyncIterator[EmuPlatform]:
        """Clean up every machine and the work directory on exit."""
        async with Fleet() as fleet:
            platform = cls(plan, fleet)
            if plan.tech not in OWNER_TECHS:
                yield platform
                return
            hosts = await asyncio.to_thread(EmulatedHosts.create, fleet.workdir / "hosts",
                                            default_amd_root())
            if plan.owner is not None and plan.owner.startswith(("unix:", "tcp:")):
                with OwnerClient(plan.owner) as client:
                    platform.launcher = AttestedLauncher(client, cls.GUEST, hosts,
                                                         platform._launch)
                    yield platform
                return
            owner = await asyncio.to_thread(platform._owner, hosts)
            platform.launcher = AttestedLauncher(owner, cls.GUEST, hosts, platform._launch)
            yield platform

    def _owner(self, hosts: EmulatedHosts) -> GuestOwner:
        """The guest owner in process; on first use it records how the guest launches
        (the tenant's act; later changes are the tenant's, ``vmmig owner expect``)."""
        ask, ark = hosts.amd_certs()
        directory = self.fleet.workdir / "owner" if self.plan.owner is None \
            else Path(self.plan.owner)
        owner = GuestOwner.open(directory, TrustAnchor(ask, ark))
        for mh_target in (False, True):
            launch = expected_launch_for(
                self.plan.tech, memory=self.plan.memory, vcpus=self.plan.vcpus,
                workload=self.plan.workload, mh_queues=self.plan.mh_queues,
                mh_target=mh_target)
            if owner.state.expected(self.GUEST, launch.kind) is None:
                owner.expect(self.GUEST, launch)
        return owner

    def describe(self) -> str:
        """The dirty-log method this host offers, e.g. ``dirty log: userfaultfd-wp ...``."""
        found = probe()
        method = "userfaultfd-wp + PAGEMAP_SCAN" if found.available else "content-compare"
        return f"emulated machines (Unicorn vCPUs), dirty log: {method}"

    def _spec(self, name: str, *, incoming: bool = False) -> EmuMachineSpec:
        plan = self.plan
        return EmuMachineSpec(name=name, memory=plan.memory, vcpus=plan.vcpus, tech=plan.tech,
                              workload=plan.workload, incoming=incoming,
                              mh_queues=plan.mh_queues if self.launcher is not None else 1,
                              psp_latency=plan.psp_latency,
                              psp_rate=plan.psp_rate,
                              mh_target=incoming and self.launcher is not None
                              and plan.strategy == "mh")

    async def _launch(self, spec: EmuMachineSpec) -> EmuMachine:
        return await self.fleet.launch(spec.name,
                                       lambda workdir: EmuMachine.launch(spec, workdir))

    async def _attested(self, role: str, spec: EmuMachineSpec, host: Path) -> EmuMachine:
        assert self.launcher is not None
        machine, self.attestations[role] = await self.launcher.launch(spec, host,
                                                                      self.fleet.workdir)
        return machine

    async def launch_source(self) -> EmuMachine:
        """Start the workload's guest and wait until its memory obeys the workload's rule.

        An encrypted guest is launched through its owner and resumed once
        attested; its memory is out of the host's reach, so it is only
        waited on to be running.
        """
        if self.launcher is not None:
            machine = await self._attested("source", self._spec("source"),
                                           self.launcher.hosts.source)
            await machine.cont()
            return machine
        machine = await self._launch(self._spec("source"))
        with machine.map_ram() as ram:
            await wait_workload_ready(self.plan.workload, ram)
        return machine

    async def launch_target(self) -> EmuMachine:
        """Start a target waiting for the guest's state (``--incoming``).

        An encrypted guest's target is on the other host: a Migration
        Handler target attested by the owner like the source, or, for the
        PSP strategy, a machine with no guest context until RECEIVE_START.
        """
        spec = self._spec("target", incoming=True)
        if self.launcher is None:
            return await self._launch(spec)
        if spec.mh_target:
            return await self._attested("target", spec, self.launcher.hosts.target)
        hosts = self.launcher.hosts
        return await self._launch(attrs.evolve(spec, host_dir=hosts.target,
                                               amd_root=hosts.root))

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
