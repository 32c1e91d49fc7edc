"""Helpers shared by the end-to-end migration tests; this module holds no tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.platforms.emu.guest_activity import wait_guest_writes
from vmmig.plugin_host import PluginHost
from vmmig.runner import open_platform, run_migration
from vmmig.workloads import wait_guest_progress


def vmmig_pids(program: bytes) -> set[int]:
    """Processes of ``program`` (a command-line substring) that belong to a vmmig run."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                # Only vmmig's: their files live in a "vmmig-" work directory.
                if any(program in arg for arg in argv) and \
                        any(b"/vmmig-" in arg for arg in argv):
                    pids.add(int(entry.name))
    return pids


@contextlib.contextmanager
def no_leftover_processes(program: bytes) -> Iterator[None]:
    """Fails if a process of ``program`` started in the block outlives it."""
    before = vmmig_pids(program)
    yield
    deadline = time.monotonic() + 10
    while (left := vmmig_pids(program) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{program.decode()} processes left running: {sorted(left)}"


class SourceWatch:
    """A plugin that keeps the migration, and acts once at the first progress report."""

    def __init__(self, on_progress=None):
        self.migration = None
        self.on_progress = on_progress

    @hookimpl
    def vmmig_phase_changed(self, migration, old, new):
        self.migration = migration

    @hookimpl
    def vmmig_progress(self, migration, progress):
        if self.on_progress is not None:
            self.on_progress(migration, progress)
            self.on_progress = None


def migrate_in_process(plan: MigrationPlan, watch: SourceWatch, platform=None, after=None,
                       plugins=()):
    """Run a migration; before the platform is torn down, report whether the source guest
    still runs there: (ok, detail), or None when the source is gone.

    :param platform: the platform class (default: the plan's).
    :param after: a dict that gets ``source-mh``, the source's ``x-query-mh``, for an
        encrypted guest still there.
    :param plugins: more plugins to register (observers).
    """
    host = PluginHost(entry_points=False)
    for index, plugin in enumerate([watch, *plugins]):
        host.pm.register(plugin, name=f"test-plugin-{index}")
    after = {} if after is None else after

    @contextlib.asynccontextmanager
    async def opener(plan):
        async with (open_platform(plan) if platform is None else platform.open(plan)) as opened:
            yield opened
            source = watch.migration.source
            if source.exited:
                return
            if plan.tech == "plain":
                with source.map_ram() as ram:
                    after["source"] = await wait_guest_progress(plan.workload, ram,
                                                                source.status)
            else:
                after["source"] = await wait_guest_writes(source, plan.workload)
                after["source-mh"] = await source.execute("x-query-mh")

    report = asyncio.run(run_migration(plan, host, opener=opener))
    return report, after.get("source")


@contextlib.contextmanager
def socket_closed_port():
    """A loopback port that is certainly closed (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def interrupt_run(args, report_path, *, after="phase transferring-memory", timeout=180):
    """Start ``vmmig run ARGS --json REPORT``, send SIGINT once ``after`` is printed.

    :return: the exit status, what it printed on stderr, and the JSON report.
    """
    process = subprocess.Popen([sys.executable, "-m", "vmmig", "run", *args,
                                "--json", str(report_path)],
                               stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        wait_for_line(process, after, timeout=timeout)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, stderr, json.loads(report_path.read_text())


def wait_for_line(process, text, timeout):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} not seen on stderr: {''.join(seen)}")
