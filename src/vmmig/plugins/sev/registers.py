"""An SEV guest's registers, which its hypervisor may read: compared after they moved."""

from __future__ import annotations

from vmmig.agents.orchestrator import machines
from vmmig.migration import Migration


__all__ = ["compare_registers"]


async def compare_registers(migration: Migration) -> None:
    """Record whether the stopped target holds the stopped source's registers."""
    source, target = machines(migration)
    moved = await source.execute("x-vcpu-state-export")
    held = await target.execute("x-vcpu-state-export")
    same = moved == held
    detail = (f"registers of all {len(moved)} vCPUs equal on both sides" if same
              else "the target's registers differ from the source's")
    migration.record_check("vcpu-state", detail, ok=same)
