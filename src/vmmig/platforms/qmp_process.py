"""One child process that serves QMP (QEMU, or an emulated machine), driven from asyncio.

Every file of a process lives in the caller's work directory under its name
(``<workdir>/<name>.qmp`` its QMP socket, ``<workdir>/<name>.log`` its
stdout and stderr, plus whatever the program adds).

The child runs in its own session, so a Ctrl-C in vmmig's terminal reaches
only vmmig, which decides what happens to the VM. When launched from the
main thread it also gets ``PR_SET_PDEATHSIG(SIGKILL)``: if vmmig dies, even
by SIGKILL, its children die too (their files stay behind).

The process is watched with a pidfd registered in the event loop rather than
through asyncio's subprocess transport: that transport kills its child when
it is closed or garbage collected, which would make it impossible to hand a
migrated VM over to the user, and it needs a watcher thread per child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import mmap
import os
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, cast

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from vmmig.errors import HostRequirementError, PlatformError


__all__ = ["QmpProcess", "default_workdir", "describe_exit", "die_with_parent_preexec",
           "log_tail", "machine_file", "map_ram_file"]

logger = logging.getLogger(__name__)

#: How long a process whose QMP connection broke is given to be seen exiting.
_EXIT_GRACE = 2.0
#: How long a SIGKILLed process may take to be reaped before we give up on it.
_KILL_GRACE = 5.0
#: Poll interval while waiting for the process to create its QMP socket.
_SOCKET_POLL = 0.01
#: Longest path a UNIX socket address holds (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 107

_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def default_workdir() -> Path:
    """Make a fresh work directory, on tmpfs when ``/dev/shm`` is writable.

    Guest RAM is a file in it: on tmpfs it costs memory, not disk writes.

    :return: the new, empty directory; the caller removes it.
    """
    shm = Path("/dev/shm")  # noqa: S108 (tmpfs on purpose; mkdtemp makes it private)
    on_tmpfs = shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
    return Path(tempfile.mkdtemp(prefix="vmmig-", dir=shm if on_tmpfs else None))


def machine_file(workdir: Path, name: str, suffix: str) -> Path:
    """``<workdir>/<name><suffix>``; not ``with_suffix``, which would eat ``.1`` of ``vm.1``."""
    return workdir / f"{name}{suffix}"


def map_ram_file(name: str, path: Path, size: int) -> mmap.mmap:
    """Map a machine's RAM file read-only, to compare or check memory.

    :raise PlatformError: the file is gone (the machine was shut down).
    """
    try:
        with path.open("rb") as ram:
            return mmap.mmap(ram.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except OSError as err:
        raise PlatformError(f"{name}: cannot map guest RAM: {err}") from err


def log_tail(path: Path, n: int = 5) -> str:
    """The last ``n`` non-empty lines of a child's log file (empty if none or no file)."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 16384))
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-n:])


def describe_exit(returncode: int) -> str:
    """``status 1`` or ``killed by SIGKILL``, for a Popen return code."""
    if returncode >= 0:
        return f"status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def die_with_parent_preexec() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child die with this process, if it can.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits,
    so it is only set up from the main thread, which lives as long as vmmig.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.info("a child started outside the main thread will not die with vmmig")
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec: two system calls, nothing else.
        # If the parent already died, the signal will never come: give up.
        if _libc.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os.write(2, b"vmmig: cannot bind the child's lifetime to vmmig (PR_SET_PDEATHSIG)\n")
            os._exit(127)

    return preexec


class QmpProcess:
    """A running child process with its QMP connection.

    Subclasses start one with :meth:`_spawn` from their own ``launch`` and
    end it with :meth:`shutdown` (or a :class:`~vmmig.platforms.fleet.Fleet`,
    which does both). Every method that talks to the process raises
    :class:`~vmmig.errors.PlatformError`, saying so when it has exited.

    :cvar program: how messages name the program, e.g. ``QEMU``.
    """

    program = "the process"

    def __init__(self, name: str, workdir: Path, process: subprocess.Popen[bytes], pidfd: int,
                 *, die_with_parent: bool) -> None:
        """Take over a started process; use the subclass's ``launch`` instead."""
        self._name = name
        self._workdir = workdir
        self._process = process
        self.die_with_parent = die_with_parent
        self._loop = asyncio.get_running_loop()
        self._exit = asyncio.Event()
        self._pidfd: int | None = pidfd
        self._loop.add_reader(pidfd, self._reap)
        self._qmp = QMPClient(name)
        self._qmp_closing: asyncio.Task[None] | None = None

    @classmethod
    async def _spawn(cls, name: str, workdir: Path, argv: Sequence[str], *,
                     die_with_parent: bool, connect_timeout: float,
                     make: Callable[[subprocess.Popen[bytes], int], Self]) -> Self:
        """Start ``argv`` with its output in ``<name>.log`` and connect to ``<name>.qmp``.

        :param make: builds the object from the process and its pidfd.
        :raise PlatformError: the program did not start or QMP did not answer;
            the message ends with the last lines it printed.
        """
        file = machine_file(workdir, name, ".qmp")
        if len(os.fsencode(file)) > _MAX_SOCKET_PATH:
            raise PlatformError(
                f"{name}: work directory {workdir} is too long a path for a UNIX socket"
            )
        logger.debug("%s: starting %s", name, " ".join(argv))
        try:
            with machine_file(workdir, name, ".log").open("wb") as log:
                process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    # Thread-safe enough: the child makes two system calls, no allocation.
                    preexec_fn=die_with_parent_preexec() if die_with_parent else None,  # noqa: PLW1509
                )
        except OSError as err:
            raise PlatformError(f"{name}: cannot start {argv[0]}: {err}") from err
        try:
            pidfd = os.pidfd_open(process.pid)
        except OSError as err:
            process.kill()
            process.wait()
            raise HostRequirementError(
                f"pidfd_open failed ({err.strerror}); vmmig needs Linux 5.3 or newer"
            ) from err
        child = make(process, pidfd)
        try:
            await child._connect(connect_timeout)
        except BaseException:
            child._abandon()
            raise
        return child

    # -- Properties -------------------------------------------------------------

    @property
    def name(self) -> str:
        """The process's name (its role, e.g. ``source``)."""
        return self._name

    @property
    def workdir(self) -> Path:
        """The directory holding its files."""
        return self._workdir

    @property
    def pid(self) -> int:
        """The process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), ``None`` while it runs."""
        return self._process.returncode

    @property
    def exited(self) -> bool:
        """Whether the process has exited (and was reaped)."""
        return self._process.returncode is not None

    @property
    def log_path(self) -> Path:
        """The file receiving the process's own output."""
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
        state = "running" if self.returncode is None else describe_exit(self.returncode)
        return f"<{type(self).__name__} {self.name} pid={self.pid} {state}>"

    # -- QMP ----------------------------------------------------------------------

    async def execute(
        self, cmd: str, args: Mapping[str, object] | None = None
    ) -> Any:  # noqa: ANN401 (QMP returns JSON of any shape)
        """Run a QMP command.

        :param cmd: the command, e.g. ``"query-status"``.
        :param args: its arguments.
        :return: the ``return`` value.
        :raise PlatformError: the command was refused, or the process exited.
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
        :raise PlatformError: no such event in time, or the process exited first.
        """
        deadline = self._loop.time() + timeout
        exited = asyncio.ensure_future(self._exit.wait())
        try:
            while True:
                # Queued events first: they may predate the exit.
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
        """Wait for the process to exit.

        :param timeout: seconds to wait at most.
        :return: the exit status, or ``None`` if it still runs.
        """
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._exit.wait()
        return self.returncode

    async def shutdown(self, timeout: float = 10.0) -> None:
        """End the process: ``quit`` over QMP, then SIGKILL if it is still there.

        Idempotent, and never raises because the process is already gone.
        Without a QMP connection it is killed at once. Then :meth:`_released`
        frees what the program left (e.g. a RAM file).

        :param timeout: seconds the process has to quit before it is killed.
        """
        if self.returncode is None and self._qmp.runstate is Runstate.RUNNING:
            deadline = self._loop.time() + timeout
            try:
                async with asyncio.timeout(timeout):
                    await self._qmp.execute("quit")
            except (QMPError, TimeoutError) as err:
                # The process may close the socket before its reply reaches us.
                logger.debug("%s: quit: %r", self.name, err)
            if await self.wait_exited(max(0.0, deadline - self._loop.time())) is None:
                logger.warning("%s: %s did not quit within %g s; killing it", self.name,
                               self.program, timeout)
        if self.returncode is None:
            self.kill()
            if await self.wait_exited(_KILL_GRACE) is None:
                logger.error("%s: %s pid %d survives SIGKILL", self.name, self.program, self.pid)
        await self._close_qmp()
        self._released()

    def kill(self) -> None:
        """Send SIGKILL unless the process has exited.

        Synchronous and idempotent, so it is safe in signal handlers and
        :mod:`atexit` hooks, where the event loop may be gone.
        """
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def log_tail(self, n: int = 5) -> str:
        """Return the last ``n`` non-empty lines the process printed (empty if none)."""
        return log_tail(self.log_path, n)

    # -- Subclass hooks -------------------------------------------------------------

    async def _connected(self) -> None:
        """Called once QMP answered: the program has set itself up."""

    def _released(self) -> None:
        """Called when the process is gone, to free what it leaves behind."""

    # -- Internals ----------------------------------------------------------------

    def _path(self, suffix: str) -> Path:
        return machine_file(self._workdir, self._name, suffix)

    def _said(self) -> str:
        """The program's last words, to append to an error message."""
        tail = self.log_tail()
        return f"; {self.program} said: {' | '.join(tail.splitlines())}" if tail else ""

    def _reap(self) -> None:
        """Record the exit; called by the loop when the pidfd becomes readable."""
        if self._process.poll() is None:
            return
        self._unwatch()
        self._exit.set()
        assert self.returncode is not None
        logger.info("%s: %s pid %d exited (%s)", self.name, self.program, self.pid,
                    describe_exit(self.returncode))

    def _unwatch(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _abandon(self) -> None:
        """Kill and reap the process synchronously: a launch failed or was cancelled."""
        self.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(_KILL_GRACE)
        if self.returncode is None:
            logger.error("%s: %s pid %d survives SIGKILL", self.name, self.program, self.pid)
        self._unwatch()

    async def _connect(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while (sock := await self._try_socket()) is None:
            if self.returncode is not None:
                raise PlatformError(
                    f"{self.name}: {self.program} failed to start "
                    f"({describe_exit(self.returncode)}){self._said()}"
                )
            if self._loop.time() >= deadline:
                raise PlatformError(
                    f"{self.name}: {self.program} did not open its QMP socket within "
                    f"{timeout:g} s{self._said()}"
                )
            # Wake at once if the process exits; otherwise look for the socket again soon.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SOCKET_POLL):
                    await self._exit.wait()
        try:
            async with asyncio.timeout(max(0.0, deadline - self._loop.time())):
                await self._qmp.connect(sock)
        except (QMPError, TimeoutError) as err:
            raise await self._connection_lost("QMP negotiation", err) from err
        await self._connected()

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
        """Wait until QMP saw EOF: every event sent before the exit is dispatched."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_GRACE):
                while self._qmp.runstate is Runstate.RUNNING:
                    await self._qmp.runstate_changed()

    async def _connection_lost(self, during: str, cause: BaseException | None) -> PlatformError:
        """Build the error for a broken QMP conversation, once the process had time to exit."""
        await self.wait_exited(_EXIT_GRACE)
        await self._close_qmp()
        if self.returncode is None:
            return PlatformError(
                f"{self.name}: QMP connection lost during {during} ({cause!r}); "
                f"{self.program} pid {self.pid} still runs"
            )
        return PlatformError(
            f"{self.name}: {self.program} exited ({describe_exit(self.returncode)}) during "
            f"{during}{self._said()}"
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
        except Exception as err:  # the connection died with the process: EOF, reset
            logger.debug("%s: QMP disconnect: %r", self.name, err)
