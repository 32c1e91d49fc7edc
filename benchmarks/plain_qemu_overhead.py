"""vmmig's orchestration overhead over raw QMP, for QEMU's own migration.

Runs the same live migration (same guest, same QEMU command lines, same
migration parameters) alternately driven by a minimal raw-QMP script and by
``vmmig run``'s code path, several times in one process tree, and reports
medians and their ratio.  The figure compared is the wall time from starting
the target QEMU to the target holding the complete guest ("migration");
vmmig's integrity verification and finalization are reported separately,
as they have no raw-QMP counterpart.

    .venv/bin/python benchmarks/plain_qemu_overhead.py --memory 1G --repetitions 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from qemu.qmp import QMPClient

from vmmig.config import MigrationPlan
from vmmig.platforms.qemu.platform import QemuPlatform
from vmmig.plugin_host import PluginHost
from vmmig.runner import run_migration


MIGRATION_PHASES = ("preparing-target", "starting-helper", "transferring-memory",
                    "stopping-source", "transferring-cpu-state")


async def raw_qmp(plan: MigrationPlan) -> float:
    """One migration driven by bare QMP commands; returns seconds from target start to done."""
    async with QemuPlatform.open(plan) as platform:
        source = await platform.launch_source()  # boots the guest; not timed
        started = time.monotonic()
        target = await platform.launch_target()
        # QEMU serves one client per monitor socket: use the launcher's qemu.qmp
        # clients directly, bypassing vmmig's wrappers.
        src: QMPClient = source.qmp
        dst: QMPClient = target.qmp
        caps = {"capabilities": [{"capability": "events", "state": True}]}
        await src.execute("migrate-set-capabilities", caps)
        await dst.execute("migrate-set-capabilities", caps)
        await src.execute("migrate-set-parameters",
                          {"downtime-limit": plan.downtime_limit, "max-bandwidth": 1 << 40})
        await dst.execute("migrate-incoming", {"uri": f"tcp:{plan.listen}:0"})
        info = await dst.execute("query-migrate")
        address = info["socket-address"][0]
        with dst.listener("MIGRATION") as events:
            await src.execute("migrate", {"uri": f"tcp:{address['host']}:{address['port']}"})
            async for event in events:
                status = event["data"]["status"]
                if status == "completed":
                    break
                if status == "failed":
                    raise RuntimeError("raw QMP migration failed")
        return time.monotonic() - started


async def through_vmmig(plan: MigrationPlan) -> tuple[float, float]:
    """One migration by vmmig; returns (migration seconds, whole-run seconds)."""
    report = await run_migration(plan, PluginHost(entry_points=False))
    if report.status != "completed":
        raise RuntimeError(f"vmmig migration {report.status}: {report.error}")
    migration = sum(report.phases.get(name, 0) for name in MIGRATION_PHASES) / 1000
    return migration, report.total_time / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--workload", default="ab")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--accel", default="auto")
    args = parser.parse_args()
    from vmmig.config import load_plan  # noqa: PLC0415

    plan = load_plan(None, {"memory": args.memory, "workload": args.workload,
                            "accel": args.accel})
    raw, ours, whole = [], [], []
    for repetition in range(args.repetitions):
        # Alternate the order so drift on a noisy machine hits both sides alike.
        order = (raw_qmp, through_vmmig) if repetition % 2 == 0 else (through_vmmig, raw_qmp)
        for driver in order:
            if driver is raw_qmp:
                raw.append(asyncio.run(raw_qmp(plan)))
            else:
                migration, total = asyncio.run(through_vmmig(plan))
                ours.append(migration)
                whole.append(total)
        print(f"rep {repetition + 1}: raw {raw[-1]:.3f} s  vmmig {ours[-1]:.3f} s "
              f"(whole run incl. verification {whole[-1]:.3f} s)", flush=True)
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    print(f"\n{args.memory} guest, workload {args.workload}, {args.repetitions} repetitions")
    print(f"raw QMP migration    median {raw_median:.3f} s")
    print(f"vmmig migration      median {ours_median:.3f} s")
    print(f"ratio vmmig/raw      {ours_median / raw_median:.3f}")
    print(f"vmmig whole run      median {statistics.median(whole):.3f} s "
          "(adds verification and finalization)")


if __name__ == "__main__":
    main()
