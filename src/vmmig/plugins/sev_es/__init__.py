"""The ``sev-es`` technology: SEV-ES guests, encrypted CPU state moved by the MH.

As ``sev`` on ``emu`` (:mod:`vmmig.plugins.sev.steps`), except that the
hypervisor can neither read nor set the guest's registers: each vCPU's
state goes sealed through the Migration Handlers, and the target's vCPUs get
it from their MH at COMMIT.  The PSP strategy is not offered (its SEV-ES
path, SEND_UPDATE_VMSA, is not wired into the agents).
"""

from __future__ import annotations

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.plugins.sev.qemu_host import sev_host_problems
from vmmig.plugins.sev.steps import (
    vmmig_finalize,
    vmmig_prepare_target,
    vmmig_rollback,
    vmmig_start_helper,
    vmmig_stop_source,
    vmmig_transfer_cpu_state,
    vmmig_transfer_memory,
    vmmig_verify_target,
)
from vmmig.technology import Technology


__all__ = ["vmmig_finalize", "vmmig_host_problems", "vmmig_prepare_target", "vmmig_rollback",
           "vmmig_start_helper", "vmmig_stop_source", "vmmig_technology",
           "vmmig_transfer_cpu_state", "vmmig_transfer_memory", "vmmig_verify_target"]


@hookimpl
def vmmig_technology() -> Technology:
    """Describe ``sev-es``."""
    return Technology(
        name="sev-es",
        summary="AMD SEV-ES: memory and encrypted vCPU state moved by the Migration Handler",
        platforms=("emu", "qemu"),
        features={"auto-converge", "bandwidth", "downtime-limit", "mh-queues"},
    )


@hookimpl
def vmmig_host_problems(plan: MigrationPlan) -> list[str] | None:
    """On ``qemu``: what this host lacks for SEV-ES (always the QEMU patches, today)."""
    return sev_host_problems(es=True) if plan.platform == "qemu" else None
