"""The orchestrator's handle on one emulated machine process (``vmmig emu start``).

The machine is a child process like QEMU, driven over its QMP socket (see
:class:`~vmmig.platforms.qmp_process.QmpProcess`).  Its files, in the
caller's work directory::

    <workdir>/<name>.qmp     QMP socket
    <workdir>/<name>.log     the process's output
    <workdir>/<name>.ram     guest RAM of a plain VM (the host may map it)
    <workdir>/<name>.dirty   the dirty page numbers, while dirty logging runs
"""

from __future__ import annotations

import logging
import mmap
import subprocess
import sys
from pathlib import Path

import attrs

from vmmig.platforms.qmp_process import QmpProcess, machine_file, map_ram_file


__all__ = ["EmuMachine", "EmuMachineSpec", "emu_argv"]

logger = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class EmuMachineSpec:
    """What to start: one emulated machine.

    :param name: the machine's role (names its files).
    :param memory: guest RAM in bytes.
    :param vcpus: number of vCPUs.
    :param tech: the technology protecting the guest.
    :param workload: the guest program (see ``vmmig emu start --help``).
    :param paused: start with the vCPUs stopped (``-S``).
    :param incoming: start as a migration target, waiting for the guest's state.
    :param launch: an SEV launch's ``vmmig emu start`` options (policy, the
        owner's session files: :meth:`vmmig.owner.LaunchFiles.emu_options`).
    :param host_dir: the emulated host whose PSP launches an SEV guest.
    :param amd_root: the emulated AMD root that endorses that host.
    :param mh_target: with ``incoming``: a Migration Handler target (firmware only).
    :param mh_queues: the Migration Handler's mailbox queues.
    :param psp_latency: the emulated PSP's latency per command, microseconds.
    :param psp_rate: the emulated PSP's guest data per second.
    """

    name: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Za-z0-9][A-Za-z0-9_.-]*"))
    memory: int = attrs.field(validator=attrs.validators.gt(0))
    vcpus: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    tech: str = "plain"
    workload: str = "ab"
    paused: bool = False
    incoming: bool = False
    launch: tuple[str, ...] = ()
    host_dir: Path | None = None
    amd_root: Path | None = None
    mh_target: bool = False
    mh_queues: int = 1
    psp_latency: float | None = None
    psp_rate: int | None = None


def emu_argv(spec: EmuMachineSpec, workdir: Path) -> list[str]:
    """The command line that starts ``spec`` with its files in ``workdir``."""
    argv = [sys.executable, "-m", "vmmig", "emu", "start", "--name", spec.name,
            "--qmp", str(machine_file(workdir, spec.name, ".qmp")), "--run-dir", str(workdir),
            "--memory", f"{spec.memory >> 10}K", "--vcpus", str(spec.vcpus), "--tech", spec.tech,
            "--workload", spec.workload]
    if spec.paused:
        argv.append("-S")
    if spec.incoming:
        argv.append("--incoming")
    argv += spec.launch
    for option, value in (("--host-dir", spec.host_dir), ("--amd-root", spec.amd_root),
                          ("--psp-latency", spec.psp_latency),
                          ("--psp-rate", None if spec.psp_rate is None else f"{spec.psp_rate}B")):
        if value is not None:
            argv += [option, str(value)]
    if spec.mh_target:
        argv.append("--mh-target")
    if spec.mh_queues != 1:
        argv += ["--mh-queues", str(spec.mh_queues)]
    return argv


class EmuMachine(QmpProcess):
    """A running emulated machine with its QMP connection."""

    program = "the emulated machine"

    def __init__(self, spec: EmuMachineSpec, workdir: Path, process: subprocess.Popen[bytes],
                 pidfd: int) -> None:
        """Take over a started machine; use :meth:`launch` instead."""
        super().__init__(spec.name, workdir, process, pidfd, die_with_parent=True)
        self.spec = spec

    @classmethod
    async def launch(cls, spec: EmuMachineSpec, workdir: Path, *,
                     connect_timeout: float = 60.0) -> EmuMachine:
        """Start the machine and connect to its QMP socket.

        :raise PlatformError: it did not start or QMP did not answer; the
            message ends with the last lines it printed.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        machine_file(workdir, spec.name, ".qmp").unlink(missing_ok=True)
        machine = await cls._spawn(
            spec.name, workdir, emu_argv(spec, workdir), die_with_parent=True,
            connect_timeout=connect_timeout,
            make=lambda process, pidfd: cls(spec, workdir, process, pidfd))
        logger.info("%s: emulated machine running, pid %d", spec.name, machine.pid)
        return machine

    @property
    def ram_path(self) -> Path:
        """The file backing a plain guest's RAM."""
        return self._path(".ram")

    def map_ram(self) -> mmap.mmap:
        """Map a plain guest's RAM read-only (an encrypted guest's RAM has no file)."""
        return map_ram_file(self.name, self.ram_path, self.spec.memory)
