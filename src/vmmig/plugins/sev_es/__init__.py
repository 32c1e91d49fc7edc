"""The ``sev-es`` technology: SEV-ES guests, encrypted CPU state moved by the MH.

Registered so that ``vmmig plugins`` lists it and ``--tech sev-es`` explains
itself; not implemented yet.
"""

from __future__ import annotations

from vmmig import hookimpl
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
