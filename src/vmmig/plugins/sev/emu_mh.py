"""``sev`` on ``emu``: the guests' Migration Handlers move the memory.

Both VMs were launched through the guest owner (the platform attests
them); the agents run the precopy engine with the MH page path: the
host's dirty log picks the pages, the source's MH seals them, the target's
MH opens them into private memory.  The host never holds plaintext, so it
cannot compare memory: the MHs do (the sealed manifest carries every
page's final version and a digest of guest RAM, checked by the target MH
before it may commit).  An SEV guest's registers are the hypervisor's to
read and set, so they move as for ``plain`` and are compared directly.
After the resume the host sees the guest write (its dirty log) and, on its
console, the guest's own checks: ``ab``'s of the a-b rule, ``regs``'s of its
register chain across the migration.
"""

from __future__ import annotations

import asyncio

from vmmig.agents import orchestrator
from vmmig.agents.mh_mailbox import MailboxClient
from vmmig.agents.mh_session import abort_mh
from vmmig.agents.orchestrator import (
    commit_mh,
    end_transfer,
    machines,
    resume_source,
    seal_mh,
    stop_source,
    transfer_memory,
)
from vmmig.errors import MigrationFailed, PlatformError
from vmmig.migration import Migration
from vmmig.platforms.emu.guest_activity import resume_and_watch
from vmmig.platforms.emu.machine_process import EmuMachine
from vmmig.platforms.emu.platform import EmuPlatform
from vmmig.plugins.sev.registers import compare_registers


__all__ = ["finalize", "prepare_target", "rollback", "start_helper", "stop_source",
           "transfer_cpu_state", "transfer_memory", "verify"]


async def prepare_target(migration: Migration) -> None:
    """An attested MH target on the other host, and both agents on the MH page path."""
    await orchestrator.prepare_target(migration, page_path="mh")
    platform = migration.platform
    assert isinstance(platform, EmuPlatform)
    migration.record_check("attestation", "; ".join(
        f"{role}: {platform.attestations[role].describe()}" for role in ("source", "target")))


async def _start_mh(machine: EmuMachine) -> None:
    """Start the machine's helper vCPU unless its agent already has."""
    if (await machine.execute("x-query-mh"))["state"] == "stopped":
        try:
            await machine.execute("x-mh-start")
        except PlatformError:
            if (await machine.execute("x-query-mh"))["state"] != "running":
                raise


async def start_helper(migration: Migration) -> None:
    """Start the helper vCPUs on which both MHs run."""
    for machine in machines(migration):
        await _start_mh(machine)


async def transfer_cpu_state(migration: Migration) -> None:
    """The hypervisor moves the SEV guest's registers, as for ``plain``."""
    await orchestrator.transfer_cpu_state(migration)


async def verify(migration: Migration) -> None:
    """The MHs compare memory (sealed manifest); the host compares the registers it moved."""
    await seal_mh(migration)
    if migration.plan.tech == "sev-es":
        vcpus = len(await machines(migration)[0].execute("query-cpus-fast"))
        migration.record_check("vcpu-state", f"the states of all {vcpus} vCPUs sealed by the "
                               "source MH and checked against its manifest by the target MH; "
                               "the hypervisor never read or set a register")
    else:
        await compare_registers(migration)


async def finalize(migration: Migration) -> None:
    """The target's MH commits, the target resumes and runs; the retired source ends."""
    source, target = machines(migration)
    await commit_mh(migration)
    for name, detail, ok in await resume_and_watch(target, migration.plan.workload,
                                                   chain_verdict=True):
        migration.record_check(name, detail, ok=ok)
    await source.shutdown()


async def rollback(migration: Migration, reason: str) -> None:
    """Before the commit: target and agents ended, the source MH's session dropped (its
    agent may have died holding it), the source resumed."""
    await end_transfer(migration, reason)
    source = machines(migration)[0]
    if not source.exited:
        await _drop_session(source)
    await resume_source(migration)


async def _drop_session(source: EmuMachine) -> None:
    """ABORT a session the source's MH still holds, through its mailbox, as an agent would.

    :raises MigrationFailed: the MH refused (sealed, with no abort token): the source
        must not resume.
    """
    info = await source.execute("x-query-mh")
    if info["role"] is None or info["state"] != "running":
        return

    def abort() -> str | None:
        with MailboxClient.connect(info["shared-path"], int(info["mailbox-gpa"]),
                                   int(info["mailbox-size"]), info["irq-path"]) as client:
            return abort_mh(client)

    refused = await asyncio.to_thread(abort)
    if refused is not None:
        raise MigrationFailed(f"the source's MH keeps its session ({refused}): the source "
                              "must not resume")
