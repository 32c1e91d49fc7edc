"""``sev --strategy psp`` on ``emu``: the PSPs move the memory, as AMD's KVM flow does.

The baseline the Migration Handler is measured against.  The source was
launched through the owner as for the MH path; the target is an incoming
machine with no guest context, which gets the guest's keys from the source
PSP: the orchestrator hands the target's PDH and certificate chain to the
source's SEND_START and the resulting session to the target's
RECEIVE_START.  The agents then move one SEND_UPDATE_DATA packet per page
(:mod:`vmmig.agents.psp_pages`); the registers move as for ``plain``.
SEND_FINISH and RECEIVE_FINISH end it, and the source's PSP never lets its
copy run again.

The PSP path has no end-to-end check of memory: each packet's MAC is
checked by the target PSP, but a packet never sent goes unnoticed, and a
packet binds no address.  The report says so.
"""

from __future__ import annotations

import contextlib

from vmmig.agents import orchestrator
from vmmig.agents.orchestrator import machines, stop_source, transfer_cpu_state, transfer_memory
from vmmig.errors import PlatformError
from vmmig.migration import Migration
from vmmig.platforms.emu.guest_activity import resume_and_watch
from vmmig.platforms.emu.platform import EmuPlatform
from vmmig.plugins.sev.registers import compare_registers


__all__ = ["finalize", "prepare_target", "rollback", "stop_source", "transfer_cpu_state",
           "transfer_memory", "verify"]


async def prepare_target(migration: Migration) -> None:
    """An incoming target on the other host; SEND_START -> RECEIVE_START; both agents."""
    await orchestrator.prepare_target(migration, page_path="psp")
    source, target = machines(migration)
    platform = migration.platform
    assert isinstance(platform, EmuPlatform)
    migration.record_check("attestation", f"source: {platform.attestations['source'].describe()}"
                           "; target: keys from the source PSP's SEND_START")
    caps = await target.execute("query-sev-capabilities")
    session = await source.execute("x-sev-send-start", {"pdh-cert": caps["pdh"],
                                                        "plat-certs": caps["cert-chain"]})
    migration.scratch["sending"] = True
    await target.execute("x-sev-receive-start", session)


async def verify(migration: Migration) -> None:
    """The host compares the registers it moved; memory it cannot check (module doc)."""
    await compare_registers(migration)
    migration.record_check("page-packets", "every page came as a PSP packet whose MAC the "
                           "target PSP verified; the PSP path has no digest of all memory")


async def finalize(migration: Migration) -> None:
    """SEND_FINISH (the source never runs again), RECEIVE_FINISH, the target resumes."""
    source, target = machines(migration)
    await source.execute("x-sev-send-finish")
    migration.scratch["sending"] = False
    migration.commit()
    await target.execute("x-sev-receive-finish")
    # A PSP target runs no firmware of the guest's that could check its chain.
    for name, detail, ok in await resume_and_watch(target, migration.plan.workload,
                                                   chain_verdict=False):
        migration.record_check(name, detail, ok=ok)
    await source.shutdown()


async def rollback(migration: Migration, reason: str) -> None:
    """SEND_CANCEL puts the source's guest back to running; then as for every agent path."""
    if migration.scratch.get("sending") and not migration.source.exited:
        # A source whose SEND_START never happened has nothing to cancel.
        with contextlib.suppress(PlatformError):
            await migration.source.execute("x-sev-send-cancel")
    await orchestrator.rollback(migration, reason)
