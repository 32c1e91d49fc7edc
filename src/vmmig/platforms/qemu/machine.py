"""One QEMU process and its QMP connection, driven from asyncio.

A :class:`QemuMachine` is started by :meth:`QemuMachine.launch` from a
frozen :class:`QemuMachineSpec`. Every file of a machine lives in the
caller's work directory under the machine's name::

    <workdir>/<name>.ram      guest RAM (memory-backend-file, share=on)
    <workdir>/<name>.qmp      QMP socket
    <workdir>/<name>.serial   serial console output
    <workdir>/<name>.log      QEMU's stdout and stderr
    <workdir>/<name>.img      the machine's own copy of the boot image

QEMU runs in its own session, so a Ctrl-C in vmmig's terminal reaches only
vmmig, which decides what happens to the VM. When launched from the main
thread it also gets ``PR_SET_PDEATHSIG(SIGKILL)``: if vmmig dies, even by
SIGKILL, its QEMU processes die too (their files stay behind).

The process is watched with a pidfd registered in the event loop rather than
through asyncio's subprocess transport: that transport kills its child when
it is closed or garbage collected, which would make it impossible to hand a
migrated VM over to the user, and it needs a watcher thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import mmap
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import attrs
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from vmmig.errors import HostRequirementError, PlatformError
from vmmig.platforms.qemu.host import Accel, QemuBinary


__all__ = ["QemuMachine", "QemuMachineSpec", "default_workdir", "qemu_argv"]

logger = logging.getLogger(__name__)

MiB = 1 << 20

#: How long a machine whose QMP connection broke is given to be seen exiting.
_EXIT_GRACE = 2.0
#: How long a SIGKILLed QEMU may take to be reaped before we give up on it.
_KILL_GRACE = 5.0
#: Poll interval while waiting for QEMU to create its QMP socket.
_SOCKET_POLL = 0.01
#: Longest path a UNIX socket address holds (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 107

_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


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
        outlive vmmig (see :meth:`~vmmig.platforms.qemu.fleet.Fleet.detach`).
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


def default_workdir() -> Path:
    """Make a fresh work directory, on tmpfs when ``/dev/shm`` is writable.

    Guest RAM is a file in it: on tmpfs it costs memory, not disk writes.

    :return: the new, empty directory; the caller removes it.
    """
    shm = Path("/dev/shm")  # noqa: S108 (tmpfs on purpose; mkdtemp makes it private)
    on_tmpfs = shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
    return Path(tempfile.mkdtemp(prefix="vmmig-", dir=shm if on_tmpfs else None))


def _machine_file(workdir: Path, name: str, suffix: str) -> Path:
    """``<workdir>/<name><suffix>``; not ``with_suffix``, which would eat ``.1`` of ``vm.1``."""
    return workdir / f"{name}{suffix}"


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
    file = functools.partial(_machine_file, workdir, spec.name)
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


def _describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def _die_with_parent() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child die with this process, if it can.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits,
    so it is only set up from the main thread, which lives as long as vmmig.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.info("QEMU started outside the main thread will not die with vmmig")
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec: two system calls, nothing else.
        # If the parent already died, the signal will never come: give up.
        if _libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os.write(2, b"vmmig: cannot bind QEMU's lifetime to vmmig (PR_SET_PDEATHSIG)\n")
            os._exit(127)

    return preexec


class QemuMachine:
    """A running QEMU process with its QMP connection.

    Use :meth:`launch` to create one and :meth:`shutdown` to end it (or a
    :class:`~vmmig.platforms.qemu.fleet.Fleet`, which does both). Every
    method that talks to QEMU raises :class:`~vmmig.errors.PlatformError`,
    saying so when QEMU has exited.
    """

    def __init__(self, spec: QemuMachineSpec, workdir: Path, process: subprocess.Popen[bytes],
                 pidfd: int) -> None:
        """Take over a started QEMU process; use :meth:`launch` instead."""
        self._spec = spec
        self._workdir = workdir
        self._process = process
        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self._pidfd: int | None = pidfd
        self._loop.add_reader(pidfd, self._reap)
        self._qmp = QMPClient(spec.name)
        self._qmp_closing: asyncio.Task[None] | None = None
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
        file = functools.partial(_machine_file, workdir, spec.name)
        if len(os.fsencode(file(".qmp"))) > _MAX_SOCKET_PATH:
            raise PlatformError(
                f"{spec.name}: work directory {workdir} is too long a path for a UNIX socket"
            )
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
        argv = qemu_argv(spec, workdir, binary)
        logger.debug("%s: starting %s", spec.name, " ".join(argv))
        try:
            with file(".log").open("wb") as log:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Thread-safe enough: the child makes two system calls, no allocation.
                    preexec_fn=_die_with_parent() if spec.die_with_parent else None,  # noqa: PLW1509
                )
        except OSError as err:
            raise PlatformError(f"{spec.name}: cannot start {binary.path}: {err}") from err
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError as err:
            process.kill()
            process.wait()
            raise HostRequirementError(
                f"pidfd_open failed ({err.strerror}); vmmig needs Linux 5.3 or newer"
            ) from err
        machine = cls(spec, workdir, process, pidfd)
        try:
            await machine._connect(connect_timeout)
        except BaseException:
            machine._abandon()
            raise
        logger.info("%s: QEMU running, pid %d, %s", spec.name, process.pid, spec.accel.reason)
        return machine

    # -- Properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The machine's name, from its spec."""
        return self._spec.name

    @property
    def spec(self) -> QemuMachineSpec:
        """What the machine was started with."""
        return self._spec

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status (negative: killed by that signal), ``None`` while it runs."""
        return self._process.returncode

    @property
    def exited(self) -> bool:
        """Whether QEMU has exited (and was reaped)."""
        return self._process.returncode is not None

    @property
    def ram_path(self) -> Path:
        """The file backing guest RAM."""
        return self._path(".ram")

    @property
    def serial_path(self) -> Path:
        """The file receiving the guest's serial console."""
        return self._path(".serial")

    @property
    def log_path(self) -> Path:
        """The file receiving QEMU's own output."""
        return self._path(".log")

    @property
    def qmp_path(self) -> Path:
        """The QMP socket (vmmig holds its only connection)."""
        return self._path(".qmp")

    @property
    def qmp(self) -> QMPClient:
        """The QMP client, for event listeners; prefer :meth:`execute` for commands."""
        return self._qmp

    def __repr__(self) -> str:
        state = "running" if self.returncode is None else _describe_exit(self.returncode)
        return f"<QemuMachine {self.name} pid={self.pid} {state}>"

    # -- QMP ----------------------------------------------------------------------

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None
    ) -> Any:  # noqa: ANN401 (QMP returns JSON of any shape)
        """Run a QMP command.

        :param cmd: the command, e.g. ``"query-status"``.
        :param args: its arguments.
        :return: QEMU's ``return`` value.
        :raise PlatformError: QEMU refused the command, or exited.
        """
        try:
            return await self._qmp.execute(cmd, args)
        except ExecuteError as err:
            raise PlatformError(f"{self.name}: QMP {cmd} failed: {err}") from err
        except QMPError as err:
            raise await self._connection_lost(f"QMP {cmd}", err) from err

    async def status(self) -> str:
        """Return the run state, e.g. ``running``, ``paused``, ``prelaunch``, ``inmigrate``."""
        return str((await self.execute("query-status"))["status"])

    async def stop(self) -> None:
        """Pause the vCPUs."""
        await self.execute("stop")

    async def cont(self) -> None:
        """Resume the vCPUs."""
        await self.execute("cont")

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """Receive QMP events while the block runs.

        Enter it *before* the action that triggers the event, or the event
        may come and go unseen::

            with machine.listen("STOP") as events:
                await machine.stop()
                await machine.wait_for_event(events, "STOP", timeout=5)

        :param names: event names; all events when none are given.
        :return: a context manager yielding the listener.
        """
        listener = EventListener(names)
        with self._qmp.listen(listener):
            yield listener

    async def wait_for_event(self, listener: EventListener, name: str, timeout: float,
                             match: Mapping[str, object] | None = None) -> dict[str, Any]:
        """Take events from ``listener`` until one called ``name`` arrives.

        Events that do not match are consumed (they stay in ``listener.history``).

        :param listener: a listener from :meth:`listen`.
        :param name: the event name, e.g. ``"MIGRATION"``.
        :param timeout: seconds to wait at most.
        :param match: items the event's ``data`` must contain, e.g.
            ``{"status": "completed"}``.
        :return: the event.
        :raise PlatformError: no such event in time, or QEMU exited first.
        """
        deadline = self._loop.time() + timeout
        exited = asyncio.ensure_future(self._exit.wait())
        try:
            while True:
                # Queued events first: they may predate QEMU's exit.
                if listener.empty():
                    getter = asyncio.ensure_future(listener.get())
                    await asyncio.wait({getter, exited}, timeout=deadline - self._loop.time(),
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        if not exited.done():
                            matching = f" with {dict(match)}" if match else ""
                            raise PlatformError(
                                f"{self.name}: no {name} event{matching} within {timeout:g} s"
                            )
                        await self._qmp_drained()
                        if listener.empty():
                            raise await self._connection_lost(f"the wait for {name}", None)
                        continue
                    event = getter.result()
                else:
                    event = await listener.get()
                data = cast(Mapping[str, object], event.get("data", {}))
                if event["event"] == name and all(
                    data.get(key) == value for key, value in (match or {}).items()
                ):
                    return dict(event)
        finally:
            exited.cancel()

    # -- Process ------------------------------------------------------------------

    async def wait_exited(self, timeout: float) -> int | None:
        """Wait for QEMU to exit.

        :param timeout: seconds to wait at most.
        :return: the exit status, or ``None`` if QEMU still runs.
        """
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._exit.wait()
        return self.returncode

    async def shutdown(self, timeout: float = 10.0) -> None:
        """End QEMU: ``quit`` over QMP, then SIGKILL if it is still there.

        Idempotent, and never raises because QEMU is already gone. Without a
        QMP connection QEMU is killed at once. Removes the RAM file (mappings
        from :meth:`map_ram` stay valid); the other files stay for inspection.

        :param timeout: seconds QEMU has to quit before it is killed.
        """
        if self.returncode is None and self._qmp.runstate is Runstate.RUNNING:
            deadline = self._loop.time() + timeout
            try:
                async with asyncio.timeout(timeout):
                    await self._qmp.execute("quit")
            except (QMPError, TimeoutError) as err:
                # QEMU may close the socket before its reply reaches us.
                logger.debug("%s: quit: %r", self.name, err)
            if await self.wait_exited(max(0.0, deadline - self._loop.time())) is None:
                logger.warning("%s: QEMU did not quit within %g s; killing it", self.name, timeout)
        if self.returncode is None:
            self.kill()
            if await self.wait_exited(_KILL_GRACE) is None:
                logger.error("%s: QEMU pid %d survives SIGKILL", self.name, self.pid)
        await self._close_qmp()
        self._remove_ram_file()

    def kill(self) -> None:
        """Send SIGKILL to QEMU unless it has exited.

        Synchronous and idempotent, so it is safe in signal handlers and
        :mod:`atexit` hooks, where the event loop may be gone.
        """
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    # -- Host views -----------------------------------------------------------

    def map_ram(self) -> mmap.mmap:
        """Map guest RAM read-only, to compare memory.

        :return: a shared mapping of all guest RAM, guest physical address
            order as QEMU lays it out in its RAM block.
        :raise PlatformError: the RAM file is gone (the machine was shut down).
        """
        try:
            with self.ram_path.open("rb") as ram:
                return mmap.mmap(ram.fileno(), self._spec.memory_mib * MiB,
                                 flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as err:
            raise PlatformError(f"{self.name}: cannot map guest RAM: {err}") from err

    def log_tail(self, n: int = 5) -> str:
        """Return the last ``n`` non-empty lines QEMU printed (empty if none)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
                text = log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join([line for line in text.splitlines() if line.strip()][-n:])

    # -- Internals ----------------------------------------------------------------

    def _path(self, suffix: str) -> Path:
        return _machine_file(self._workdir, self._spec.name, suffix)

    def _said(self) -> str:
        """QEMU's last words, to append to an error message."""
        tail = self.log_tail()
        return f"; QEMU said: {' | '.join(tail.splitlines())}" if tail else ""

    def _remove_ram_file(self) -> None:
        """Free guest RAM on tmpfs, unless the file now belongs to a newer machine of our name."""
        with contextlib.suppress(FileNotFoundError):
            ram = self.ram_path.stat()
            if (ram.st_dev, ram.st_ino) == self._ram_file_id:
                self.ram_path.unlink()

    def _reap(self) -> None:
        """Record QEMU's exit; called by the loop when the pidfd becomes readable."""
        if self._process.poll() is None:
            return
        self._unwatch()
        self._exit.set()
        assert self.returncode is not None
        logger.info("%s: QEMU pid %d exited (%s)", self.name, self.pid,
                    _describe_exit(self.returncode))

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _abandon(self) -> None:
        """Kill and reap QEMU synchronously: a launch failed or was cancelled."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(_KILL_GRACE)
        if self.returncode is None:
            logger.error("%s: QEMU pid %d survives SIGKILL", self.name, self.pid)
        self._unwatch()

    async def _connect(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while (sock := await self._try_socket()) is None:
            if self.returncode is not None:
                raise PlatformError(
                    f"{self.name}: QEMU failed to start ({_describe_exit(self.returncode)})"
                    f"{self._said()}"
                )
            if self._loop.time() >= deadline:
                raise PlatformError(
                    f"{self.name}: QEMU did not open its QMP socket within {timeout:g} s"
                    f"{self._said()}"
                )
            # Wake at once if QEMU exits; otherwise look for the socket again soon.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SOCKET_POLL):
                    await self._exit.wait()
        try:
            async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                await self._qmp.connect(sock)
        except (QMPError, TimeoutError) as err:
            raise await self._connection_lost("QMP negotiation", err) from err
        # QEMU answers qmp_capabilities from its main loop, which starts only
        # after the machine (and its RAM file) is set up.
        ram = self.ram_path.stat()
        self._ram_file_id = (ram.st_dev, ram.st_ino)

    async def _try_socket(self) -> socket.socket | None:
        """Connect to the QMP socket ourselves, so failed attempts are quiet."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, str(self.qmp_path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    async def _qmp_drained(self) -> None:
        """Wait until QMP saw EOF: every event QEMU sent before it exited is dispatched."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_GRACE):
                while self._qmp.runstate is Runstate.RUNNING:
                    await self._qmp.runstate_changed()

    async def _connection_lost(self, during: str, cause: BaseException | None) -> PlatformError:
        """Build the error for a broken QMP conversation, once QEMU had time to exit."""
        await self.wait_exited(_EXIT_GRACE)
        await self._close_qmp()
        if self.returncode is None:
            return PlatformError(
                f"{self.name}: QMP connection lost during {during} ({cause!r}); "
                f"QEMU pid {self.pid} still runs"
            )
        return PlatformError(
            f"{self.name}: QEMU exited ({_describe_exit(self.returncode)}) during {during}"
            f"{self._said()}"
        )

    async def _close_qmp(self) -> None:
        """Disconnect QMP once, however many callers ask, and whatever the state."""
        if self._qmp_closing is None:
            self._qmp_closing = self._loop.create_task(self._disconnect_qmp())
        # wait() rather than await: a cancelled caller must not cancel the cleanup.
        await asyncio.wait({self._qmp_closing})

    async def _disconnect_qmp(self) -> None:
        if self._qmp.runstate is Runstate.IDLE:
            return
        try:
            await self._qmp.disconnect()
        except Exception as err:  # the connection died with QEMU: EOF, reset
            logger.debug("%s: QMP disconnect: %r", self.name, err)
