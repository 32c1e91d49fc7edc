"""A Fleet owns the machine processes of one vmmig run and ends them all.

::

    async with Fleet() as fleet:
        source = await fleet.launch("source", lambda workdir: QemuMachine.launch(...))
        target = await fleet.launch("target", lambda workdir: EmuMachine.launch(...))
        ...
    # every machine has quit (or was killed), the work directory is gone

Cleanup runs on every way out of the ``async with`` block: normal exit, an
exception, cancellation, KeyboardInterrupt. An :mod:`atexit` hook kills what
is left if the event loop never got to run it. If vmmig itself is killed
(SIGTERM, SIGKILL) neither runs; its children still die, by
``PR_SET_PDEATHSIG`` (see :mod:`vmmig.platforms.qmp_process`), but the work
directory, RAM files included, stays behind. The CLI should turn SIGTERM into
cancellation so that the normal path runs.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from vmmig.errors import PlatformError
from vmmig.platforms.qmp_process import QmpProcess, default_workdir


__all__ = ["Fleet"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=QmpProcess)


class Fleet:
    """Launches machine processes into one work directory and shuts them all down.

    :param workdir: where the machines' files go; by default a fresh
        :func:`~vmmig.platforms.qmp_process.default_workdir`, which the
        fleet removes at exit. A directory given here is never removed.
    :param keep_workdir: keep the fleet's own work directory (to read logs).
    :param shutdown_timeout: seconds each machine has to quit before SIGKILL.
    """

    def __init__(self, *, workdir: Path | None = None, keep_workdir: bool = False,
                 shutdown_timeout: float = 10.0) -> None:
        self._given_workdir = workdir
        self._workdir: Path | None = None
        self._keep_workdir = keep_workdir or workdir is not None
        self._shutdown_timeout = shutdown_timeout
        self._machines: list[QmpProcess] = []

    @property
    def workdir(self) -> Path:
        """The directory holding the machines' files."""
        if self._workdir is None:
            raise RuntimeError("Fleet.workdir is only known inside 'async with Fleet(...)'")
        return self._workdir

    @property
    def machines(self) -> tuple[QmpProcess, ...]:
        """The machines the fleet will shut down, in launch order."""
        return tuple(self._machines)

    async def __aenter__(self) -> Fleet:
        if self._workdir is not None:
            raise RuntimeError("a Fleet can be entered only once")
        self._workdir = self._given_workdir or default_workdir()
        atexit.register(self._kill_all)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            results = await asyncio.gather(
                *(machine.shutdown(self._shutdown_timeout) for machine in self._machines),
                return_exceptions=True,
            )
            for machine, result in zip(self._machines, results, strict=True):
                if isinstance(result, BaseException):
                    logger.error("%s: shutdown failed: %r", machine.name, result)
        finally:
            # Reached with machines still alive only if the shutdown itself was
            # interrupted (a second Ctrl-C): do not leave them running.
            self._kill_all()
            atexit.unregister(self._kill_all)

    async def launch(self, name: str, start: Callable[[Path], Awaitable[M]]) -> M:
        """Start a machine in the fleet's work directory and take charge of it.

        :param name: the machine's name; it must not belong to a live machine
            of this fleet (they would share files).
        :param start: starts the machine given the work directory, e.g.
            ``lambda workdir: QemuMachine.launch(spec, workdir, binary)``.
        :return: the running machine.
        :raise PlatformError: as ``start``, or for a name in use.
        """
        if any(m.name == name and not m.exited for m in self._machines):
            raise PlatformError(f"{name}: a machine of that name is already running")
        machine = await start(self.workdir)
        self._machines.append(machine)
        return machine

    def detach(self, machine: QmpProcess) -> None:
        """Stop tracking a machine that must keep running, e.g. a migrated VM for the user.

        The fleet then keeps its work directory, which holds the machine's
        QMP socket and disk. The caller owns the machine from now on.

        :param machine: a machine of this fleet, launched with
            ``die_with_parent=False`` (otherwise it dies with vmmig anyway).
        :raise PlatformError: the machine is bound to vmmig's lifetime.
        :raise ValueError: the machine is not in this fleet.
        """
        if machine.die_with_parent:
            raise PlatformError(
                f"{machine.name}: cannot outlive vmmig; launch it with die_with_parent=False"
            )
        self._machines.remove(machine)
        if not self._keep_workdir:
            logger.info("keeping %s: it holds the files of %s", self.workdir, machine.name)
            self._keep_workdir = True

    def _kill_all(self) -> None:
        """SIGKILL every machine still alive and remove the work directory; synchronous."""
        for machine in self._machines:
            machine.kill()
        self._machines.clear()
        if self._workdir is not None and not self._keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
