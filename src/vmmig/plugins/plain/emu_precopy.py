"""``plain`` on the ``emu`` platform: vmmig's precopy engine in agent processes.

The agents map the guest's RAM and read and set its registers, as a
hypervisor may for an unprotected VM (:mod:`vmmig.agents.orchestrator`
runs them).  Verification compares both RAM files byte for byte and checks
the workload's own rule; finalization resumes the target and watches the
guest continue there.
"""

from __future__ import annotations

import asyncio

from vmmig.agents.orchestrator import (
    machines,
    prepare_target,
    rollback,
    stop_source,
    transfer_cpu_state,
    transfer_memory,
)
from vmmig.errors import IntegrityError
from vmmig.guests.emu.regs_check import check_regs_chain, regs_checkpoints
from vmmig.integrity import compare_ram_files
from vmmig.migration import Migration
from vmmig.workloads import check_workload, wait_guest_progress


__all__ = ["finalize", "prepare_target", "rollback", "stop_source", "transfer_cpu_state",
           "transfer_memory", "verify"]


async def verify(migration: Migration) -> None:
    """Compare both stopped guests' RAM byte for byte, then the workload's own rule."""
    source, target = machines(migration)
    for machine in (source, target):
        if await machine.status() == "running":
            raise IntegrityError(f"{machine.name}: guest is running during verification")
    scan = await asyncio.to_thread(compare_ram_files, source.ram_path, target.ram_path)
    migration.record_check("memory", scan.comparison.describe(), ok=scan.comparison.identical)
    with target.map_ram() as ram:
        name, detail, ok = check_workload(migration.plan.workload, scan, ram)
        migration.scratch["checkpoints"] = regs_checkpoints(ram)
    migration.record_check(name, detail, ok=ok)


async def finalize(migration: Migration) -> None:
    """Commit, resume the target, check the guest runs there, retire the source.

    For ``regs`` the target is paused once more after it ran, to check that
    the checkpoints it wrote since the migration continue the chain.
    """
    source, target = machines(migration)
    migration.commit()
    await target.cont()
    with target.map_ram() as ram:
        ok, detail = await wait_guest_progress(migration.plan.workload, ram, target.status)
        migration.record_check("guest-running", detail, ok=ok)
        if ok and migration.plan.workload == "regs":
            await target.stop()
            regs = check_regs_chain(ram, since=migration.scratch["checkpoints"])
            await target.cont()
            migration.record_check("register-chain-after-resume", regs.detail, ok=regs.ok)
    await source.shutdown()
