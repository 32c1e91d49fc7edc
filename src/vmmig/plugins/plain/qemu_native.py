"""``plain`` on the ``qemu`` platform: QEMU's own precopy migration.

QEMU's stream carries memory, CPU and device state together and QEMU stops
the source itself when it converges, so this technology leaves out the
``stop_source`` and ``transfer_cpu_state`` steps.  Events are enabled on
both sides and the listener is registered before ``migrate``, as libvirt
and QEMU's qtests do; statistics come from polling ``query-migrate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import attrs
from qemu.qmp import EventListener

from vmmig.errors import IntegrityError, MigrationFailed, PlatformError
from vmmig.integrity import compare_ram_files
from vmmig.migration import Migration
from vmmig.platforms.qemu import QemuMachine
from vmmig.report import Progress, RamStats, RoundReport
from vmmig.workloads import check_workload, wait_guest_progress


__all__ = ["finalize", "prepare_target", "rollback", "transfer_memory", "verify"]

#: How often statistics are polled while QEMU migrates (progress a few times a second).
STATS_INTERVAL = 0.25
#: Bound on QEMU's own bookkeeping waits (status settling, cancel taking effect).
SETTLE_TIMEOUT = 30.0
#: ``max-bandwidth`` when the plan sets no cap (QEMU's default would be 128 MiB/s).
UNLIMITED_BANDWIDTH = 1 << 40


def _source(migration: Migration) -> QemuMachine:
    machine = migration.source
    assert isinstance(machine, QemuMachine)
    return machine


def _target(migration: Migration) -> QemuMachine:
    machine = migration.target
    assert isinstance(machine, QemuMachine)
    return machine


async def prepare_target(migration: Migration) -> None:
    """Launch the paused target with ``-incoming defer`` and start listening."""
    plan = migration.plan
    target: QemuMachine = await migration.platform.launch_target()
    migration.target = target
    capabilities = [
        {"capability": "events", "state": True},
        {"capability": "auto-converge", "state": plan.auto_converge},
        {"capability": "multifd", "state": plan.multifd_channels > 0},
    ]
    parameters: dict[str, Any] = {
        "downtime-limit": plan.downtime_limit,
        "max-bandwidth": plan.bandwidth << 20 if plan.bandwidth else UNLIMITED_BANDWIDTH,
    }
    if plan.multifd_channels:
        parameters["multifd-channels"] = plan.multifd_channels
    for machine in (_source(migration), target):
        await machine.execute("migrate-set-capabilities", {"capabilities": capabilities})
        if plan.multifd_channels:
            await machine.execute("migrate-set-parameters",
                                  {"multifd-channels": plan.multifd_channels})
    await _source(migration).execute("migrate-set-parameters", parameters)
    listen = migration.platform.incoming_uri()
    await target.execute("migrate-incoming", {"uri": listen})
    migration.scratch["uri"] = plan.migrate_uri or await _listening_uri(target, listen)


async def _listening_uri(target: QemuMachine, listen: str) -> str:
    """The URI the source must connect to (the real port when listening on port 0)."""
    if not listen.startswith("tcp:"):
        return listen
    info = await target.execute("query-migrate")
    for address in info.get("socket-address", []):
        if address.get("type") == "inet":
            return f"tcp:{address['host']}:{address['port']}"
    raise PlatformError(f"target: QEMU did not report the port it listens on ({listen})")


async def transfer_memory(migration: Migration) -> None:
    """Run ``migrate`` and follow it to ``completed``, reporting progress and passes.

    Completion is taken from ``MIGRATION`` events on both sides, not from
    polling, so that vmmig adds no latency to QEMU's own migration.
    """
    source, target = _source(migration), _target(migration)
    started = time.monotonic()
    with source.listen("MIGRATION", "MIGRATION_PASS") as events, \
            target.listen("MIGRATION") as target_events:
        await source.execute("migrate", {"uri": migration.scratch["uri"]})
        migration.scratch["migrating"] = True
        await _follow_source(migration, events)
        await target.wait_for_event(target_events, "MIGRATION", SETTLE_TIMEOUT,
                                    match={"status": "completed"})
    await _settle_completed(migration, started)


async def _follow_source(migration: Migration, events: EventListener) -> None:
    """Report statistics a few times a second until the source says completed."""
    source = _source(migration)
    last_pass = 0
    status = "setup"
    while status != "completed":
        with contextlib.suppress(TimeoutError):
            event = await asyncio.wait_for(events.get(), STATS_INTERVAL)
            data = event["data"]
            if event["event"] == "MIGRATION" and isinstance(data, dict):
                status = str(data["status"])
        if status in {"failed", "cancelled"}:
            info = await source.execute("query-migrate")
            raise MigrationFailed(f"QEMU migration {status}: {info.get('error-desc', status)}")
        if status == "completed":
            break
        info = await source.execute("query-migrate")
        if "ram" not in info:
            continue
        ram = RamStats.from_qmp(info["ram"])
        migration.ram = ram
        for number in range(last_pass + 1, ram.dirty_sync_count + 1):
            migration.round_done(RoundReport(number, ram.transferred, ram.remaining,
                                             ram.dirty_pages_rate))
        last_pass = max(last_pass, ram.dirty_sync_count)
        migration.progress(Progress(ram.transferred, ram.remaining, ram.total, ram.mbps,
                                    ram.dirty_sync_count))


async def _settle_completed(migration: Migration, started: float) -> None:
    # QEMU 7.2 may report "completed" before it fills in total-time and downtime.
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        info = await _source(migration).execute("query-migrate")
        if (info.get("total-time") and "downtime" in info) or time.monotonic() > deadline:
            break
        await asyncio.sleep(STATS_INTERVAL)
    final = RamStats.from_qmp(info.get("ram", {}))
    # QEMU zeroes the dirty rate once the job ends; keep the last one measured.
    migration.ram = attrs.evolve(final, dirty_pages_rate=final.dirty_pages_rate
                                 or migration.ram.dirty_pages_rate)
    migration.downtime_ms = int(info.get("downtime", 0))
    migration.setup_ms = int(info.get("setup-time", 0))
    migration.scratch["qemu-total-time"] = int(info.get("total-time",
                                                        (time.monotonic() - started) * 1000))


async def verify(migration: Migration) -> None:
    """Compare both paused guests' RAM byte for byte, then the workload's own rule."""
    source, target = _source(migration), _target(migration)
    for machine in (source, target):
        if await machine.status() == "running":
            raise IntegrityError(f"{machine.name}: guest is running during verification")
    scan = await asyncio.to_thread(compare_ram_files, source.ram_path, target.ram_path)
    migration.record_check("memory", scan.comparison.describe(), ok=scan.comparison.identical)
    name, detail, ok = check_workload(migration.plan.workload, scan)
    migration.record_check(name, detail, ok=ok)


async def finalize(migration: Migration) -> None:
    """Commit, resume the target, check the guest runs there, retire the source."""
    source, target = _source(migration), _target(migration)
    migration.commit()
    await target.cont()
    with target.map_ram() as ram:
        ok, detail = await wait_guest_progress(migration.plan.workload, ram, target.status)
    migration.record_check("guest-running", detail, ok=ok)
    await source.shutdown()


async def rollback(migration: Migration, reason: str) -> None:
    """Cancel QEMU's migration, destroy the target, and make sure the source runs."""
    migration.log.info("rolling back: %s", reason)
    source = _source(migration)
    if migration.target is not None:
        await _target(migration).shutdown()
    if source.exited:
        raise MigrationFailed(f"source QEMU is gone (exit status {source.returncode}); "
                              "nothing to resume")
    if migration.scratch.get("migrating"):
        await source.execute("migrate_cancel")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while (status := await source.status()) != "running":
        if status in {"postmigrate", "paused"}:
            await source.cont()
        elif time.monotonic() > deadline:
            raise MigrationFailed(f"source: still {status!r} {SETTLE_TIMEOUT:.0f} s after cancel")
        await asyncio.sleep(STATS_INTERVAL)
