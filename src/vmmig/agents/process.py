"""The orchestrator's handle on an agent process: start it, read its events, command it.

The agent speaks the JSON-lines protocol of :mod:`vmmig.agents.agent`.  An
``error`` event, an exit, or silence past a deadline become
:class:`~vmmig.errors.MigrationFailed` naming the agent and what it said.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmmig.errors import MigrationFailed, PlatformError
from vmmig.platforms.qmp_process import describe_exit, die_with_parent_preexec, log_tail


__all__ = ["AgentProcess"]

logger = logging.getLogger(__name__)

#: How long an agent gets to exit on its own before it is killed.
_EXIT_GRACE = 5.0
#: The longest event line we accept.
_LINE_LIMIT = 1 << 20

Event = dict[str, Any]


class AgentProcess:
    """One running ``vmmig agent`` process."""

    def __init__(self, role: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
        """Take over a started agent; use :meth:`start` instead."""
        self.role = role
        self._process = process
        self.log_path = log_path

    @classmethod
    async def start(cls, role: str, qmp: Path, address: str, log_path: Path,
                    options: Sequence[str] = ()) -> AgentProcess:
        """Start ``vmmig agent ROLE`` for the machine at ``qmp``.

        :param address: where a target listens, or where a source connects.
        :param options: more ``vmmig agent`` options (the source's limits).
        :raise PlatformError: the process could not be started.
        """
        argv = [sys.executable, "-m", "vmmig", "agent", role, "--qmp", str(qmp),
                "--address", address, *options]
        logger.debug("%s agent: starting %s", role, " ".join(argv))
        try:
            with log_path.open("wb") as log:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=log, start_new_session=True, limit=_LINE_LIMIT,
                    # Two system calls in the child, no allocation (see qmp_process).
                    preexec_fn=die_with_parent_preexec())
        except OSError as err:
            raise PlatformError(f"cannot start the {role} agent: {err}") from err
        return cls(role, process, log_path)

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit status, ``None`` while it runs."""
        return self._process.returncode

    async def expect(self, name: str, timeout: float | None = None,
                     on_event: Callable[[Event], None] = lambda _e: None) -> Event:
        """Read events until one called ``name``; others go to ``on_event``.

        :raise MigrationFailed: the agent reported an error, exited, or was
            silent for ``timeout`` seconds.
        """
        while True:
            try:
                async with asyncio.timeout(timeout):
                    line = await self._process.stdout.readline()  # type: ignore[union-attr]
            except TimeoutError:
                raise MigrationFailed(f"{self.role} agent: no {name!r} within "
                                      f"{timeout:g} s") from None
            if not line:
                raise await self._gone(f"before {name!r}")
            event: Event = json.loads(line)
            if event.get("event") == "error":
                raise MigrationFailed(f"{self.role} agent: {event.get('message')}")
            if event.get("event") == name:
                return event
            on_event(event)

    async def error(self, timeout: float) -> str | None:
        """The agent's error event, if it reports one within ``timeout`` s (events
        before it are dropped: call this only once the migration has failed)."""
        stdout = self._process.stdout
        assert stdout is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while line := await stdout.readline():
                    event: Event = json.loads(line)
                    if event.get("event") == "error":
                        return str(event.get("message"))
        return None

    async def command(self, cmd: str) -> None:
        """Send one command line.

        :raise MigrationFailed: the agent is gone.
        """
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"cmd": cmd}).encode() + b"\n")
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._gone(f"before the {cmd!r} command") from None

    async def close(self) -> None:
        """End the agent: close its input (it aborts if it was waiting), then kill it.

        Idempotent; never raises because the agent is already gone.
        """
        stdin = self._process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_EXIT_GRACE):
                    await self._process.wait()
        self.kill()
        await self._process.wait()
        # Read the pipe to its end so that its transport closes before the event
        # loop does (otherwise asyncio warns of an unclosed transport at exit).
        stdout = self._process.stdout
        if stdout is not None:
            with contextlib.suppress(ConnectionError, ValueError):
                await stdout.read()

    def kill(self) -> None:
        """SIGKILL the agent unless it has exited; synchronous and idempotent."""
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def _gone(self, when: str) -> MigrationFailed:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_EXIT_GRACE):
                await self._process.wait()
        status = "still running" if self.returncode is None else describe_exit(self.returncode)
        tail = log_tail(self.log_path, 3)
        said = f"; it said: {' | '.join(tail.splitlines())}" if tail else ""
        return MigrationFailed(f"{self.role} agent ended ({status}) {when}{said}")
