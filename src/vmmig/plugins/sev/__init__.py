"""The ``sev`` technology: AMD SEV guests moved by the guest's Migration Handler.

Registered so that ``vmmig plugins`` lists it and ``--tech sev`` explains
itself; the Migration Handler path is not implemented yet.
"""

from __future__ import annotations

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.plugins.sev.qemu_host import sev_host_problems
from vmmig.technology import Technology


@hookimpl
def vmmig_technology() -> Technology:
    """Describe ``sev``."""
    return Technology(
        name="sev",
        summary="AMD SEV: pages re-encrypted by the guest's Migration Handler",
        platforms=("emu", "qemu"),
        unavailable="not implemented yet (needs the emulated platform and the Migration Handler)",
    )


@hookimpl
def vmmig_host_problems(plan: MigrationPlan) -> list[str] | None:
    """On ``qemu``: what this host lacks for SEV (always the QEMU patches, today)."""
    return sev_host_problems(es=False) if plan.platform == "qemu" else None
