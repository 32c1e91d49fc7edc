"""The ``sev`` technology: AMD SEV guests moved by the guest's Migration Handler.

On ``emu`` (:mod:`.emu_mh`) every VM is launched through the guest owner,
and the MHs seal and open the pages the precopy engine picks; with
``--strategy psp`` (:mod:`.emu_psp`) the PSPs' SEND/RECEIVE commands do, as
AMD's KVM flow, for comparison.  On ``qemu``
the host check (:mod:`.qemu_host`) stops the run with what the host lacks:
upstream QEMU cannot run an MH today.
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
    """Describe ``sev``."""
    return Technology(
        name="sev",
        summary="AMD SEV: pages re-encrypted by the guest's Migration Handler",
        platforms=("emu", "qemu"),
        features={"auto-converge", "bandwidth", "downtime-limit", "mh-queues", "psp-strategy"},
    )


@hookimpl
def vmmig_host_problems(plan: MigrationPlan) -> list[str] | None:
    """On ``qemu``: what this host lacks for SEV (always the QEMU patches, today)."""
    return sev_host_problems(es=False) if plan.platform == "qemu" else None
