"""The ``qemu`` platform as the runner and the technologies see it.

It owns the QEMU processes of one ``vmmig run`` (through a :class:`Fleet`),
boots the workload's guest image on the source, and starts targets waiting
for an incoming migration, paused (``-S``) so both sides can be compared
before the target runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from vmmig.config import MigrationPlan
from vmmig.errors import PlatformError
from vmmig.guests.build import build_image
from vmmig.platforms.fleet import Fleet
from vmmig.platforms.qemu.host import Accel, QemuBinary, choose_accel, find_qemu
from vmmig.platforms.qemu.machine import QemuMachine, QemuMachineSpec
from vmmig.workloads import guest_image_name, wait_workload_ready


__all__ = ["QemuPlatform"]

#: How long a booting guest gets to announce itself on its serial port.
BOOT_TIMEOUT = 120.0
_POLL = 0.05


class QemuPlatform:
    """Real QEMU, KVM when /dev/kvm is usable, TCG otherwise."""

    name = "qemu"

    def __init__(self, plan: MigrationPlan, fleet: Fleet, binary: QemuBinary, accel: Accel) -> None:
        self.plan = plan
        self.fleet = fleet
        self.binary = binary
        self.accel = accel
        self.image = build_image(guest_image_name(plan.workload))  # type: ignore[arg-type]

    @classmethod
    @asynccontextmanager
    async def open(cls, plan: MigrationPlan) -> AsyncIterator[QemuPlatform]:
        """Find QEMU, choose the accelerator, and clean up every process on exit."""
        binary = find_qemu()
        accel = choose_accel(plan.accel)  # type: ignore[arg-type]
        async with Fleet() as fleet:
            yield cls(plan, fleet, binary, accel)

    def describe(self) -> str:
        """E.g. ``QEMU 7.2.22, KVM (/dev/kvm usable)``."""
        return f"QEMU {'.'.join(map(str, self.binary.version))}, {self.accel.reason}"

    def _spec(self, name: str, *, incoming: str | None = None) -> QemuMachineSpec:
        return QemuMachineSpec(name=name, memory_mib=self.plan.memory >> 20,
                               vcpus=self.plan.vcpus, accel=self.accel, boot_image=self.image,
                               paused=incoming is not None, incoming=incoming)

    async def _launch(self, spec: QemuMachineSpec) -> QemuMachine:
        return await self.fleet.launch(
            spec.name, lambda workdir: QemuMachine.launch(spec, workdir, self.binary))

    async def launch_source(self) -> QemuMachine:
        """Boot the workload's guest and wait until it runs its program."""
        machine = await self._launch(self._spec("source"))
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"A" not in _read(machine.serial_path):
            if machine.exited:
                raise PlatformError(f"source: QEMU exited while booting: {machine.log_tail()}")
            if time.monotonic() > deadline:
                raise PlatformError(f"source: guest did not boot within {BOOT_TIMEOUT:.0f} s "
                                    "(no 'A' on its serial port)")
            await asyncio.sleep(_POLL)
        with machine.map_ram() as ram:
            await wait_workload_ready(self.plan.workload, ram)
        return machine

    async def launch_target(self) -> QemuMachine:
        """Start a paused target waiting for ``migrate-incoming``."""
        return await self._launch(self._spec("target", incoming="defer"))

    def incoming_uri(self) -> str:
        """Where the target listens: the plan's transport, an ephemeral port or socket."""
        if self.plan.transport == "unix":
            return f"unix:{self.fleet.workdir / 'migration.sock'}"
        return f"tcp:{self.plan.listen}:0"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
