"""One emulated VM (the *machine*): guest RAM, vCPUs and dirty log, served over QMP.

A machine runs in its own process (``vmmig emu start``) and is driven, like
QEMU, only through its QMP socket.  QEMU's command names where QEMU has one
(``query-status``, ``stop``, ``cont``, ``query-cpus-fast``, ``quit``), an
``x-`` prefix for what QEMU has no command for:

``x-query-memory``
    RAM size, and the path of a plain VM's RAM file, which the host may map;
    of an SEV VM, the shared segment's path and its shared ranges.
``x-query-shared``
    The pages the guest shares (KVM_HC_MAP_GPA_RANGE), ``[{gpa, pages}]``;
    each change is announced by an ``X_MEMORY_ATTRIBUTES`` event
    (:mod:`.shared_pages`).
``x-dirty-log-start`` / ``x-dirty-log-sync`` / ``x-dirty-log-stop``
    The kernel's dirty log over guest RAM.  A sync collects and re-arms it
    atomically and writes the dirty page numbers (little-endian u64, in
    ascending order) at the start of ``<run-dir>/<name>.dirty``, which the
    host maps; it returns how many there are.  The file keeps the reply small
    whatever the dirty count, and a sync costs O(dirty pages), not O(RAM).
``x-cpu-throttle``
    Make the vCPUs sleep a percentage of the time (QEMU's auto-converge throttle).
``x-vcpu-state-export`` / ``x-vcpu-state-import``
    Every vCPU's VMSA page (base64), for technologies whose registers the
    hypervisor may read and set (plain, SEV).  Refused for SEV-ES.
``x-query-console``
    What the guest printed on its serial port (COM1), which is the host's to
    read on real hardware too: ``{"counts": {char: times}, "tail": last
    characters}``.  Our guests print progress marks there (ab: ``B`` per
    pass, ``X`` when its own check of the a-b rule fails).
``x-memory-read`` / ``x-memory-write``
    Guest memory as the hypervisor reads and writes it (``gpa``, ``size`` or
    base64 ``data``; at most :data:`MAX_HOST_ACCESS` bytes a call): plaintext
    of a plain VM; of an SEV VM's private RAM, ciphertext read, and written
    bytes taken for ciphertext, so the guest finds garbage there.  Tests use
    them to show the hardware's rules through QMP.

SEV and SEV-ES machines (``--tech sev|sev-es``) launch through their host's
emulated PSP as QEMU's ``sev-guest`` object does (:mod:`.sev_launch`), and
serve QEMU's ``query-sev``, ``query-sev-capabilities``,
``query-sev-launch-measure`` and ``sev-inject-launch-secret``
(:mod:`.sev_qmp`, which a plain machine answers with QEMU's errors).  They
migrate through the PSP's own path with ``x-sev-send-*`` and, started with
``--incoming`` (no guest context until then), ``x-sev-receive-*``
(:mod:`.sev_migration_qmp`).

The Migration Handler.  An SEV machine's launch image carries the MH
firmware (the built-in blob, or ``--firmware FILE``) and its measured
launch configuration, and the top of its RAM, from a 2 MiB boundary, is the
MH's mailbox reservation (:mod:`.mh_layout`): the workloads (ab's region,
the dirty program's, the regs ring) end below it.  ``x-mh-start`` runs the
MH on its helper vCPU and ``x-query-mh`` reports it (:mod:`.mh_runtime`).
Started with ``--incoming --mh-target`` (and the owner's launch inputs), a
machine is an MH migration target: launched and attested like any SEV
guest, with the firmware and no workload; its vCPUs stay parked and
``cont`` is refused until its MH committed an imported guest.  A source
whose MH sealed its manifest or retired refuses ``cont`` (no fork); after
ABORT it may run again.

Status follows QEMU's run states: ``running``, ``paused``, ``prelaunch`` (an
SEV machine started with ``-S``: launched and measured, waiting for its
owner's secret and ``cont``), ``inmigrate`` (started with ``--incoming``:
vCPUs wait for their state), ``postmigrate``.
"""

from __future__ import annotations

import base64
import binascii
import mmap
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal

import attrs
import numpy as np

from vmmig.config import parse_size
from vmmig.errors import ConfigError
from vmmig.firmware.abi import Role
from vmmig.firmware.image import builtin_image
from vmmig.guests.emu import (
    DATA_START,
    AbParams,
    DirtyParams,
    EntryState,
    RegsParams,
    load_image,
    load_program,
)
from vmmig.guests.emu.regs_check import ENTRY_SIZE
from vmmig.platforms.emu.console import SerialConsole
from vmmig.platforms.emu.dirtylog import DirtyLog, open_dirty_log
from vmmig.platforms.emu.guest_checks import watch_regs_chain
from vmmig.platforms.emu.guest_cpus import VcpuStates
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.mh_layout import MhReservation, load_firmware
from vmmig.platforms.emu.mh_runtime import MhRuntime, register_mh_commands
from vmmig.platforms.emu.psp import PspError
from vmmig.platforms.emu.qmp_schema import CommandTable, QmpCommandError
from vmmig.platforms.emu.sev_launch import SevConfig, SevGuest, check_sev_config, launch_chunks
from vmmig.platforms.emu.sev_migration_qmp import SevMigrationCommands
from vmmig.platforms.emu.sev_qmp import SevCommands
from vmmig.platforms.emu.shared_pages import SharedPages
from vmmig.platforms.emu.vcpu import MAX_THROTTLE, Vcpu, VcpuState
from vmmig.platforms.emu.vmsa import Vmsa


__all__ = ["EMU_WORKLOADS", "MAX_HOST_ACCESS", "Machine", "MachineConfig", "launch_chunks_for",
           "load_guest", "load_workload", "mh_reservation"]

PAGE: Final = 4096
#: Workloads an emulated guest runs: ``dirty:RATE`` dirties RATE bytes of new pages
#: per second, in address order or (``dirty:RATE:random``) at random.
EMU_WORKLOADS: Final = ("ab", "fill", "idle", "regs", "dirty:RATE[:random]")
_HLT: Final = b"\xf4"
#: How long a pause may take: a vCPU stops at the next instruction boundary.
PAUSE_TIMEOUT: Final = 5.0
#: The most bytes one ``x-memory-read`` or ``x-memory-write`` moves (a QMP reply stays small).
MAX_HOST_ACCESS: Final = 1 << 20


@attrs.frozen
class MachineConfig:
    """What ``vmmig emu start`` starts.

    :ivar name: names the machine's files in ``run_dir``.
    :ivar memory: guest RAM in bytes.
    :ivar vcpus: vCPUs; vCPU 0 runs the workload, the others are parked.
    :ivar tech: the technology protecting the guest.
    :ivar workload: ``ab``, ``idle``, ``regs`` or ``dirty:RATE``.
    :ivar incoming: start as a migration target: no program, vCPUs wait for their state.
    :ivar run_dir: where the RAM file and dirty page list live.
    :ivar qmp: the QMP socket to create; ``<run_dir>/<name>.qmp`` by default.
    :ivar sev: the launch inputs of an ``sev`` or ``sev-es`` machine.
    :ivar firmware: the MH firmware blob an SEV machine loads; None for the built-in one.
    :ivar mh_queues: the MH mailbox's queues (helper vCPUs), 1 to 4.
    :ivar mh_target: with ``incoming``: launched through the owner with the MH
        firmware only, to receive a guest from a source's MH.
    """

    name: str = attrs.field(validator=attrs.validators.matches_re(r"[A-Za-z0-9][A-Za-z0-9_.-]*"))
    memory: int
    vcpus: int = 1
    tech: str = "plain"
    workload: str = "ab"
    incoming: bool = False
    run_dir: Path = Path()
    qmp: Path | None = None
    sev: SevConfig | None = None
    firmware: bytes | None = attrs.field(default=None, repr=False)
    mh_queues: int = 1
    mh_target: bool = False

    @property
    def qmp_path(self) -> Path:
        """The QMP socket: ``qmp``, or ``<run_dir>/<name>.qmp`` by default."""
        return self.qmp if self.qmp is not None else self.run_dir / f"{self.name}.qmp"


def load_workload(ram: mmap.mmap, workload: str, end: int | None = None) -> EntryState:
    """Load the program that runs ``workload`` into guest RAM, as firmware would.

    :param end: where the workload's data must end (None: the end of RAM).
    :raises ConfigError: for an unknown workload.
    """
    program, params = program_for(workload, end)
    if program == "idle":
        return load_image(ram, _HLT)
    return load_program(ram, program, params=params)  # type: ignore[arg-type]


def _initial_vmsas(entry: EntryState | None, vcpus: int) -> list[Vmsa]:
    """Every vCPU's launch registers: the entry state for vCPU 0, reset state for the rest."""
    return [Vmsa() if entry is None else entry.vmsa] + [Vmsa()] * (vcpus - 1)


def mh_reservation(config: MachineConfig) -> MhReservation | None:
    """The MH mailbox reservation of an SEV machine; None for plain.

    :raises ConfigError: MH options on a plain machine, or RAM too small.
    """
    if config.tech == "plain":
        given = [name for name, value in (("--firmware", config.firmware is not None),
                                          ("--mh-queues", config.mh_queues != 1),
                                          ("--mh-target", config.mh_target)) if value]
        if given:
            raise ConfigError("tech", f"only sev and sev-es machines take {', '.join(given)}")
        return None
    if config.mh_target and not config.incoming:
        raise ConfigError("mh-target", "--mh-target is a migration target's: add --incoming")
    return MhReservation(config.memory, config.mh_queues)


def load_guest(ram: mmap.mmap, config: MachineConfig) -> EntryState | None:
    """Load what ``config`` boots: the workload and, on SEV, the MH firmware.

    :returns: vCPU 0's entry state; None for an MH target (no workload).
    :raises ConfigError: an unknown workload, bad MH options, a firmware that does not fit.
    """
    reservation = mh_reservation(config)
    if reservation is None:
        return load_workload(ram, config.workload)
    entry = None if config.mh_target else \
        load_workload(ram, config.workload, reservation.mailbox_gpa)
    roles = frozenset({Role.TARGET if config.mh_target else Role.SOURCE})
    image = builtin_image() if config.firmware is None else config.firmware
    load_firmware(ram, reservation, roles, image)
    return entry


def launch_chunks_for(config: MachineConfig) -> list[bytes]:
    """What an SEV machine started with ``config`` measures: the guest owner's expectation.

    The owner loads the same workload and MH firmware into a scratch RAM of
    the same size, as a real owner hashes the firmware build it handed to
    the host; feed the result to :func:`~vmmig.platforms.emu.psp.launch_digest`.
    """
    with mmap.mmap(-1, config.memory) as scratch:
        entry = load_guest(scratch, config)
        return launch_chunks(scratch, _initial_vmsas(entry, config.vcpus),
                             es=config.tech == "sev-es")


def program_for(workload: str, end: int | None = None
                ) -> tuple[str, AbParams | DirtyParams | RegsParams | None]:
    """The guest program and parameters that run ``workload``.

    :param end: where the workload's data must end (None: the end of RAM).
    :raises ConfigError: for an unknown workload or a bad dirty rate.
    """
    if workload in {"ab", "fill"}:
        return "ab64", AbParams(end=end, passes=1 if workload == "fill" else 0)
    if workload == "regs":
        if end is None:
            return "regs", RegsParams()
        room = (end - DATA_START) // ENTRY_SIZE
        return "regs", RegsParams(ring_entries=min(RegsParams().ring_entries, room))
    if workload == "idle":
        return "idle", None
    if match := re.fullmatch(r"dirty:([^:]+)(?::(sequential|random))?", workload):
        try:
            rate = parse_size(match[1])
        except ValueError as err:
            raise ConfigError("workload", f"dirty rate: {err}") from None
        pattern: Literal["sequential", "random"] = "random" if match[2] == "random" \
            else "sequential"
        try:
            return "dirty", DirtyParams(bytes_per_second=rate, end=end, pattern=pattern)
        except ValueError as err:
            raise ConfigError("workload", f"dirty rate: {err}") from None
    raise ConfigError("workload", f"{workload!r} is not an emulated workload; choose one of "
                      f"{', '.join(EMU_WORKLOADS)}")


class Machine:
    """One emulated VM; its QMP commands are in :attr:`commands`."""

    def __init__(self, config: MachineConfig) -> None:
        check_sev_config(config.tech, config.sev)
        reservation = mh_reservation(config)
        self.config = config
        if config.sev is None:
            self.memory = GuestMemory(config.memory, path=config.run_dir / f"{config.name}.ram")
        else:
            self.memory = GuestMemory(config.memory, private=True,
                                      shared_path=config.run_dir / f"{config.name}.shared")
        #: What the guest printed on COM1 (its progress marks).
        self.console = SerialConsole()
        #: A migrated regs guest's own check of its chain (:mod:`.guest_checks`).
        self._chain_watch: threading.Thread | None = None
        self.shared_pages = SharedPages(self.memory, dirty_log=lambda: self._dirty_log,
                                        # on_event is rebound once the QMP server runs
                                        emit=lambda event, data: self.on_event(event, data))  # noqa: PLW0108
        self.vcpus = [Vcpu(i, self.memory.ram, on_port_write=self.console.write,
                           on_hypercall=self.shared_pages.hypercall)
                      for i in range(config.vcpus)]
        self.status = "inmigrate" if config.incoming else "paused"
        #: Receives QMP events (name, data); the process wires it to its QMP server.
        self.on_event: Callable[[str, Mapping[str, object] | None], None] = lambda _e, _d: None
        self._dirty_log: DirtyLog | None = None
        self._dirty_path = config.run_dir / f"{config.name}.dirty"
        self._dirty_pages: mmap.mmap | None = None
        #: The SEV guest context (PSP, handle, measurement); None for plain.
        self.sev: SevGuest | None = None
        launched = not config.incoming or config.mh_target
        #: The Migration Handler of a launched SEV guest; None otherwise.
        self.mh = None if reservation is None or not launched else MhRuntime(
            self.memory, self.shared_pages, reservation=reservation,
            irq_path=config.run_dir / f"{config.name}.mh", target=config.mh_target,
            cpus=VcpuStates(self.vcpus) if config.tech == "sev-es" else None)
        if launched:
            try:
                self._boot(config)
            except BaseException:
                self.close()
                raise
        self.commands = CommandTable()
        for name, handler in (
            ("query-status", self.query_status), ("stop", self.stop), ("cont", self.cont),
            ("query-cpus-fast", self.query_cpus_fast), ("x-query-memory", self.query_memory),
            ("x-dirty-log-start", self.dirty_log_start), ("x-dirty-log-sync", self.dirty_log_sync),
            ("x-dirty-log-stop", self.dirty_log_stop), ("x-cpu-throttle", self.cpu_throttle),
            ("x-vcpu-state-export", self.vcpu_state_export),
            ("x-vcpu-state-import", self.vcpu_state_import),
            ("x-query-console", self.query_console),
        ):
            self.commands.add(name, handler)
        self.commands.add("x-memory-read", self.memory_read)
        self.commands.add("x-memory-write", self.memory_write)
        self.shared_pages.register(self.commands)
        register_mh_commands(self.commands, self.mh)
        migration = SevMigrationCommands(self, config.sev,
                                         incoming=config.incoming and not config.mh_target)
        migration.register(self.commands)
        SevCommands(lambda: self.sev, migration.host).register(self.commands)

    def _boot(self, config: MachineConfig) -> None:
        """Load the workload and, for SEV, launch it through the PSP (``prelaunch``).

        An MH target loads the firmware only and stays ``inmigrate``.
        """
        entry = load_guest(self.memory.ram, config)
        if entry is not None and (config.sev is None or not config.sev.policy.es):
            self.vcpus[0].load_vmsa(entry.vmsa)
        if config.sev is not None:
            self.sev = SevGuest.launch(config.sev, self.memory, self.vcpus,
                                       _initial_vmsas(entry, config.vcpus))
            self.status = "inmigrate" if config.mh_target else "prelaunch"

    # -- run state ---------------------------------------------------------------

    def query_console(self) -> dict[str, object]:
        """``x-query-console``: the serial output's character counts and its last 256."""
        return {"counts": self.console.counts(), "tail": self.console.text[-256:]}

    def query_status(self) -> dict[str, object]:
        """QEMU's ``query-status``."""
        return {"status": self.status, "running": self.status == "running",
                "singlestep": False}

    def start(self) -> None:
        """Run the workload's vCPU (the others stay parked)."""
        if self.mh is not None:
            self.mh.check_may_run()
        self._resume_vcpus()
        self.status = "running"

    def stop(self) -> None:
        """Pause every vCPU at an instruction boundary (QEMU's ``stop``)."""
        for vcpu in self.vcpus:
            if vcpu.state is VcpuState.RUNNING:
                vcpu.pause(PAUSE_TIMEOUT)
        if self.status in {"running", "inmigrate"}:
            self.status = "paused"
            self.on_event("STOP", None)

    def cont(self) -> None:
        """Resume the guest (QEMU's ``cont``); a target resumes after its state arrived."""
        if self.status == "running":
            return
        if self.mh is not None:
            self.mh.check_may_run()
        if self.mh is not None and self.mh.target and self._chain_watch is None and \
                self.config.workload == "regs":
            # A migrated regs guest's first run: it checks its chain across the move.
            self._chain_watch = watch_regs_chain(self.memory.ram, self.console)
        self._resume_vcpus()
        self.status = "running"
        self.on_event("RESUME", None)

    def _resume_vcpus(self) -> None:
        vcpu = self.vcpus[0]
        if vcpu.state is VcpuState.PAUSED:
            if self.sev is None and self.config.sev is not None:
                raise QmpCommandError("GenericError", "SEV: no guest context: an incoming "
                                      "guest runs after x-sev-receive-finish")
            if vcpu.vmsa.rip == 0:
                raise QmpCommandError("GenericError", "vCPU 0 has no state to run")
            if self.sev is not None:
                # QEMU's sev_vm_state_change: the first run finishes the launch.
                try:
                    self.sev.finish()
                except PspError as err:
                    raise QmpCommandError("GenericError", f"SEV: {err}") from None
            if vcpu.thread_started:
                vcpu.resume()
            else:
                vcpu.run_thread()

    def cpu_throttle(self, percentage: int) -> None:
        """Make every vCPU sleep ``percentage`` % of the time (0 to 99), as auto-converge does."""
        if not 0 <= percentage <= MAX_THROTTLE:
            raise QmpCommandError("GenericError", f"percentage must be 0-{MAX_THROTTLE}, "
                                  f"not {percentage}")
        for vcpu in self.vcpus:
            vcpu.throttle = percentage

    def query_cpus_fast(self) -> list[dict[str, object]]:
        """QEMU's ``query-cpus-fast``, plus each vCPU's own state."""
        return [{"cpu-index": vcpu.index, "target": "x86_64",
                 "qom-path": f"/machine/cpu{vcpu.index}", "props": {"core-id": vcpu.index},
                 "x-state": vcpu.state.value, "x-detail": vcpu.detail} for vcpu in self.vcpus]

    # -- memory ----------------------------------------------------------------------

    def query_memory(self) -> dict[str, object]:
        """RAM size and the files the host may map: a plain VM's RAM, an SEV VM's shared pages."""
        path = self.memory.path
        return {"size": self.memory.size, "ram-path": None if path is None else str(path),
                "encrypted": self.memory.encrypted, "dirty-pages-path": str(self._dirty_path),
                **self.shared_pages.query_memory()}

    def dirty_log_start(self) -> dict[str, object]:
        """Start dirty logging; the first sync reports what was written since."""
        if self._dirty_log is None:
            with self.shared_pages.lock:  # no page changes backing before the log is known
                self._dirty_log = open_dirty_log(self.memory.ram)
            size = self.memory.size // PAGE * 8  # room for every page number
            with self._dirty_path.open("w+b") as stream:
                stream.truncate(size)
                self._dirty_pages = mmap.mmap(stream.fileno(), size)
        return {"method": self._dirty_log.method}

    def dirty_log_sync(self) -> dict[str, object]:
        """Collect and re-arm the dirty log; the page numbers go to the dirty file."""
        if self._dirty_log is None or self._dirty_pages is None:
            raise QmpCommandError("GenericError", "dirty logging is not started")
        pages = np.asarray(self._dirty_log.collect(), dtype="<u8")
        self._dirty_pages[:pages.nbytes] = pages.tobytes()
        return {"dirty": len(pages)}

    def dirty_log_stop(self) -> None:
        """Stop dirty logging."""
        if self._dirty_log is not None:
            self._dirty_log.close()
            self._dirty_log = None
        if self._dirty_pages is not None:
            self._dirty_pages.close()
            self._dirty_pages = None

    # -- CPU state -------------------------------------------------------------------

    def vcpu_state_export(self) -> list[str]:
        """Every vCPU's VMSA page, base64; the guest must be stopped."""
        self._require_register_access("export vCPU state")
        self._require_stopped("export vCPU state")
        return [base64.b64encode(vcpu.save_vmsa().pack()).decode() for vcpu in self.vcpus]

    def vcpu_state_import(self, vmsas: list[str]) -> None:
        """Load every vCPU's VMSA page (base64) into a stopped target."""
        self._require_register_access("import vCPU state")
        self._require_stopped("import vCPU state")
        if len(vmsas) != len(self.vcpus):
            raise QmpCommandError("GenericError", f"{len(vmsas)} vCPU states for "
                                  f"{len(self.vcpus)} vCPUs")
        for vcpu, encoded in zip(self.vcpus, vmsas, strict=True):
            vcpu.load_vmsa(Vmsa.unpack(base64.b64decode(encoded)))

    def _require_stopped(self, action: str) -> None:
        if self.status == "running":
            raise QmpCommandError("GenericError", f"cannot {action} of a running guest")

    def _require_register_access(self, action: str) -> None:
        """SEV-ES keeps registers in the encrypted VMSA: the hypervisor cannot get or set them."""
        if self.config.tech == "sev-es":
            raise QmpCommandError("GenericError", f"cannot {action}: an SEV-ES guest's "
                                  "registers are in its encrypted VMSA, out of the "
                                  "hypervisor's reach")

    # -- the hypervisor's view of guest memory ----------------------------------------

    def memory_read(self, gpa: int, size: int) -> dict[str, object]:
        """``size`` bytes at ``gpa`` as the hypervisor reads them, base64."""
        self._check_host_access(size)
        try:
            data = self.memory.host_read(gpa, size)
        except ValueError as err:
            raise QmpCommandError("GenericError", str(err)) from None
        return {"data": base64.b64encode(data).decode("ascii")}

    def memory_write(self, gpa: int, data: str) -> None:
        """Write base64 ``data`` at ``gpa`` as the hypervisor does."""
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise QmpCommandError("GenericError", "Parameter 'data' is not base64") from None
        self._check_host_access(len(raw))
        try:
            self.memory.host_write(gpa, raw)
        except ValueError as err:
            raise QmpCommandError("GenericError", str(err)) from None

    @staticmethod
    def _check_host_access(size: int) -> None:
        if not 0 < size <= MAX_HOST_ACCESS:
            raise QmpCommandError("GenericError", f"{size} bytes: one access moves 1 to "
                                  f"{MAX_HOST_ACCESS} bytes")

    def close(self) -> None:
        """Stop every vCPU (the MH's helper too) and release the RAM."""
        if self.mh is not None:
            self.mh.close()
        for vcpu in self.vcpus:
            vcpu.stop(PAUSE_TIMEOUT)
        self.dirty_log_stop()
        self._dirty_path.unlink(missing_ok=True)
        if self.sev is not None:
            self.sev.close()
        self.memory.close()
