"""One QEMU process and its QMP connection, driven from asyncio.

A :class:`QemuMachine` is started by :meth:`QemuMachine.launch` from a
frozen :class:`QemuMachineSpec`. Every file of a machine lives in the
caller's work directory under the machine's name::

    <workdir>/<name>.ram      guest RAM (memory-backend-file, share=on)
    <workdir>/<name>.qmp      QMP socket
    <workdir>/<name>.serial   serial console output
    <workdir>/<name>.log      QEMU's stdout and stderr
    <workdir>/<name>.img      the machine's own copy of the boot image

Process lifetime, QMP and events are :class:`~vmmig.platforms.qmp_process.QmpProcess`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import shutil
import subprocess
from pathlib import Path

import attrs

from vmmig.errors import PlatformError
from vmmig.platforms.qemu.host import Accel, QemuBinary
from vmmig.platforms.qmp_process import QmpProcess, machine_file, map_ram_file


__all__ = ["QemuMachine", "QemuMachineSpec", "qemu_argv"]

logger = logging.getLogger(__name__)

MiB = 1 << 20


@attrs.frozen(kw_only=True)
class QemuMachineSpec:
    """What to start: one x86-64 ``pc`` machine.

    :param name: the machine's role, e.g. ``"source"`` or ``"target"``; names
        its files, so letters, digits, ``_``, ``.`` and ``-`` only.
    :param memory_mib: guest RAM in MiB.
    :param vcpus: number of vCPUs.
    :param accel: the accelerator (see :func:`~vmmig.platforms.qemu.host.choose_accel`).
    :param boot_image: a raw disk image booted as an IDE disk; the machine
        boots its own copy, because QEMU locks the images it opens.
    :param paused: start with the vCPUs stopped (``-S``, status ``prelaunch``).
    :param incoming: ``-incoming`` value, e.g. ``"defer"``; status ``inmigrate``.
    :param extra_args: appended to QEMU's command line as they are.
    :param die_with_parent: QEMU is SIGKILLed when vmmig dies. Turn it off
        only for a machine that may be handed over to the user and must
        outlive vmmig (see :meth:`~vmmig.platforms.fleet.Fleet.detach`).
    """

    name: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Za-z0-9][A-Za-z0-9_.-]*"))
    memory_mib: int = attrs.field(validator=attrs.validators.gt(0))
    vcpus: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    accel: Accel
    boot_image: Path | None = None
    paused: bool = False
    incoming: str | None = None
    extra_args: tuple[str, ...] = ()
    die_with_parent: bool = True


def _opt(value: Path) -> str:
    """Quote a path for a QEMU ``key=value,...`` option, where a comma is written twice."""
    return str(value).replace(",", ",,")


def qemu_argv(spec: QemuMachineSpec, workdir: Path, binary: QemuBinary) -> list[str]:
    """Build the command line :meth:`QemuMachine.launch` runs.

    :param spec: the machine.
    :param workdir: the directory for the machine's files.
    :param binary: the QEMU to run.
    :return: the full argument vector, executable first.
    """
    file = functools.partial(machine_file, workdir, spec.name)
    kvm = spec.accel.name == "kvm"
    argv = [
        str(binary.path),
        "-name", spec.name,
        "-nodefaults", "-no-user-config", "-display", "none",
        "-accel", spec.accel.name,
        # KVM rewrites the kvmclock page of a paused guest, which would break
        # byte-for-byte memory comparison after migration.
        "-cpu", "qemu64,kvmclock=off" if kvm else "qemu64",
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mib}M",
        # A shared file so vmmig can map guest RAM to check its integrity.
        "-object", f"memory-backend-file,id=ram0,size={spec.memory_mib}M,"
                   f"mem-path={_opt(file('.ram'))},share=on",
        "-machine", "pc,memory-backend=ram0",
        "-serial", f"file:{file('.serial')}",
        "-chardev", f"socket,id=qmp,path={_opt(file('.qmp'))},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
    ]
    if spec.boot_image is not None:
        # IDE, not floppy: SeaBIOS times out on the floppy under nested KVM.
        argv += ["-drive", f"file={_opt(file('.img'))},format=raw,if=ide"]
    if spec.paused:
        argv.append("-S")
    if spec.incoming is not None:
        argv += ["-incoming", spec.incoming]
    argv += spec.extra_args
    return argv


class QemuMachine(QmpProcess):
    """A running QEMU process with its QMP connection.

    Use :meth:`launch` to create one and :meth:`shutdown` to end it (or a
    :class:`~vmmig.platforms.fleet.Fleet`, which does both).
    """

    program = "QEMU"

    def __init__(self, spec: QemuMachineSpec, workdir: Path, process: subprocess.Popen[bytes],
                 pidfd: int) -> None:
        """Take over a started QEMU process; use :meth:`launch` instead."""
        super().__init__(spec.name, workdir, process, pidfd, die_with_parent=spec.die_with_parent)
        self._spec = spec
        #: (st_dev, st_ino) of the RAM file QEMU opened, known once QMP answers.
        self._ram_file_id: tuple[int, int] | None = None

    @classmethod
    async def launch(cls, spec: QemuMachineSpec, workdir: Path, binary: QemuBinary, *,
                     connect_timeout: float = 30.0) -> QemuMachine:
        """Start QEMU and connect to its QMP monitor.

        Files left in ``workdir`` by an earlier machine of the same name are
        replaced: a stale RAM file would leak old memory into the new guest.

        :param spec: the machine to start.
        :param workdir: the directory for its files (created if missing).
        :param binary: the QEMU to run.
        :param connect_timeout: seconds QEMU has to open its QMP socket.
        :return: the running machine.
        :raise PlatformError: QEMU did not start or QMP did not answer; the
            message ends with the last lines QEMU printed.
        """
        file = functools.partial(machine_file, workdir, spec.name)
        workdir.mkdir(parents=True, exist_ok=True)
        for suffix in (".ram", ".qmp"):
            file(suffix).unlink(missing_ok=True)
        if spec.boot_image is not None:
            try:
                await asyncio.to_thread(shutil.copyfile, spec.boot_image, file(".img"))
            except OSError as err:
                raise PlatformError(
                    f"{spec.name}: cannot copy boot image {spec.boot_image}: {err.strerror}"
                ) from err
        machine = await cls._spawn(
            spec.name, workdir, qemu_argv(spec, workdir, binary),
            die_with_parent=spec.die_with_parent, connect_timeout=connect_timeout,
            make=lambda process, pidfd: cls(spec, workdir, process, pidfd))
        logger.info("%s: QEMU running, pid %d, %s", spec.name, machine.pid, spec.accel.reason)
        return machine

    @property
    def spec(self) -> QemuMachineSpec:
        """What the machine was started with."""
        return self._spec

    @property
    def ram_path(self) -> Path:
        """The file backing guest RAM."""
        return self._path(".ram")

    @property
    def serial_path(self) -> Path:
        """The file receiving the guest's serial console."""
        return self._path(".serial")

    def map_ram(self) -> mmap.mmap:
        """Map guest RAM read-only, to compare memory.

        :return: a shared mapping of all guest RAM, guest physical address
            order as QEMU lays it out in its RAM block.
        :raise PlatformError: the RAM file is gone (the machine was shut down).
        """
        return map_ram_file(self.name, self.ram_path, self._spec.memory_mib * MiB)

    async def _connected(self) -> None:
        # QEMU answers qmp_capabilities from its main loop, which starts only
        # after the machine (and its RAM file) is set up.
        ram = self.ram_path.stat()
        self._ram_file_id = (ram.st_dev, ram.st_ino)

    def _released(self) -> None:
        """Free guest RAM on tmpfs, unless the file now belongs to a newer machine of our name.

        Mappings from :meth:`map_ram` stay valid.
        """
        with contextlib.suppress(FileNotFoundError):
            ram = self.ram_path.stat()
            if (ram.st_dev, ram.st_ino) == self._ram_file_id:
                self.ram_path.unlink()
