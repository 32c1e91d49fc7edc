"""The ``sev-es`` technology: SEV-ES guests, encrypted CPU state moved by the MH.

Registered so that ``vmmig plugins`` lists it and ``--tech sev-es`` explains
itself; not implemented yet.
"""

from __future__ import annotations

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.plugins.sev.qemu_host import sev_host_problems
from vmmig.technology import Technology


@hookimpl
def vmmig_technology() -> Technology:
    """Describe ``sev-es``."""
    return Technology(
        name="sev-es",
        summary="AMD SEV-ES: memory and encrypted vCPU state moved by the Migration Handler",
        platforms=("emu", "qemu"),
        unavailable="not implemented yet (needs the emulated platform and the Migration Handler)",
    )


@hookimpl
def vmmig_host_problems(plan: MigrationPlan) -> list[str] | None:
    """On ``qemu``: what this host lacks for SEV-ES (always the QEMU patches, today)."""
    return sev_host_problems(es=True) if plan.platform == "qemu" else None
