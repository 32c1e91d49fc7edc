"""Launching an SEV guest through its owner, on the run's emulated hosts.

SEV has no attestation after boot, so every VM of a migration is launched
through the guest owner: the source (its boot image: workload and Migration
Handler) and each target (the firmware alone, its MH waiting to receive).
A launch::

    files = launch_files(owner, guest, host chain, kind)   owner checks the chain
    vmmig emu start -S --policy ... --dh-cert-file ... --session-file ... --host-dir HOST
    attest_and_inject(owner, guest, qmp, session)        owner checks the measurement
                                                         and injects the master secret

A refusal (:class:`~vmmig.owner.AttestationError`) ends the machine and
names the reason; nothing of the secret left the owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs

from vmmig.owner import (
    AttestationError,
    LaunchKind,
    OwnerService,
    attest_and_inject,
    launch_files,
)
from vmmig.platforms.emu.machine_process import EmuMachine, EmuMachineSpec
from vmmig.platforms.emu.sev_hosts import EmulatedHosts


__all__ = ["Attestation", "AttestedLauncher"]


@attrs.frozen
class Attestation:
    """What the owner accepted of one launch, for the report.

    :ivar host: the emulated host the VM runs on.
    :ivar kind: the launch's kind (boot or migration target).
    :ivar measure: the accepted MEASURE, hex.
    :ivar policy: the guest policy the session carried.
    """

    host: str
    kind: LaunchKind
    measure: str
    policy: int

    def describe(self) -> str:
        """One line, e.g. ``boot on host-a: measurement 3fa2c1d0... accepted, policy 0x1``."""
        return (f"{self.kind.value} launch on {self.host}: measurement {self.measure[:16]} "
                f"accepted, policy {self.policy:#x}, secret injected")


@attrs.frozen
class AttestedLauncher:
    """Starts one guest's VMs through its owner.

    :ivar owner: the guest owner (in process or an :class:`~vmmig.owner.OwnerClient`).
    :ivar guest: the guest's id at the owner.
    :ivar hosts: the run's emulated hosts.
    :ivar start: starts a machine from its spec (the fleet's launch).
    """

    owner: OwnerService
    guest: str
    hosts: EmulatedHosts
    start: Callable[[EmuMachineSpec], Awaitable[EmuMachine]]

    async def launch(self, spec: EmuMachineSpec, host: Path, directory: Path
                     ) -> tuple[EmuMachine, Attestation]:
        """Start ``spec`` on ``host`` with a session from the owner, attest it, inject the secret.

        A boot launch is left paused (``prelaunch``), a migration target in ``inmigrate``.

        :param directory: where the session files go.
        :raises AttestationError: the owner refused; the machine is shut down.
        """
        kind = LaunchKind.MIGRATION_TARGET if spec.mh_target else LaunchKind.BOOT
        chain = await asyncio.to_thread(self.hosts.chain, host)
        files = await asyncio.to_thread(launch_files, self.owner, self.guest, chain,
                                        directory, kind=kind)
        machine = await self.start(attrs.evolve(
            spec, paused=not spec.incoming, launch=tuple(files.emu_options()), host_dir=host,
            amd_root=self.hosts.root))
        try:
            measurement = await attest_and_inject(self.owner, self.guest, machine.execute,
                                                  session=files.offer.session)
        except AttestationError:
            await machine.shutdown()
            raise
        return machine, Attestation(host.name, kind, measurement.measure.hex(),
                                    files.offer.policy.value)
