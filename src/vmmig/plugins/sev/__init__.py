"""The ``sev`` technology: AMD SEV guests moved by the guest's Migration Handler.

On ``emu`` (:mod:`.emu_mh`) every VM is launched through the guest owner,
and the MHs seal and open the pages the precopy engine picks; with
``--strategy psp`` (:mod:`.emu_psp`) the PSPs' SEND/RECEIVE commands do, as
AMD's KVM flow, for comparison.  On ``qemu``
the host check (:mod:`.qemu_host`) stops the run with what the host lacks:
upstream QEMU cannot run an MH today.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import ModuleType

from vmmig import hookimpl
from vmmig.config import MigrationPlan
from vmmig.errors import UnsupportedError
from vmmig.migration import Migration
from vmmig.plugins.sev import emu_mh, emu_psp
from vmmig.plugins.sev.qemu_host import sev_host_problems
from vmmig.technology import Technology


#: Each strategy's implementation of the steps on emu, by the steps' names.
_BY_STRATEGY: dict[str, ModuleType] = {"mh": emu_mh, "psp": emu_psp}


def _step(migration: Migration, name: str, *args: object) -> Awaitable[None] | None:
    if migration.plan.platform != "emu":
        raise UnsupportedError(f"sev migrates on emu only; {migration.plan.platform} lacks "
                               "the Migration Handler")
    module = _BY_STRATEGY[migration.plan.strategy]
    if name == "start_helper" and not hasattr(module, name):  # the PSP has no helper vCPU
        return None
    return getattr(module, name)(migration, *args)  # type: ignore[no-any-return]


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


@hookimpl
def vmmig_prepare_target(migration: Migration) -> Awaitable[None] | None:
    """Launch an attested MH target on the other host; start both agents."""
    return _step(migration, "prepare_target")


@hookimpl
def vmmig_start_helper(migration: Migration) -> Awaitable[None] | None:
    """Start the helper vCPUs that run both Migration Handlers."""
    return _step(migration, "start_helper")


@hookimpl
def vmmig_transfer_memory(migration: Migration) -> Awaitable[None] | None:
    """Precopy rounds; the MHs seal and open each batch."""
    return _step(migration, "transfer_memory")


@hookimpl
def vmmig_stop_source(migration: Migration) -> Awaitable[None] | None:
    """Pause the source and send what is still dirty."""
    return _step(migration, "stop_source")


@hookimpl
def vmmig_transfer_cpu_state(migration: Migration) -> Awaitable[None] | None:
    """Move the registers (an SEV guest's are the hypervisor's to move)."""
    return _step(migration, "transfer_cpu_state")


@hookimpl
def vmmig_verify_target(migration: Migration) -> Awaitable[None] | None:
    """The MHs check memory with the sealed manifest; the host compares registers."""
    return _step(migration, "verify")


@hookimpl
def vmmig_finalize(migration: Migration) -> Awaitable[None] | None:
    """The target's MH commits, the target resumes, the source is retired."""
    return _step(migration, "finalize")


@hookimpl
def vmmig_rollback(migration: Migration, reason: str) -> Awaitable[None] | None:
    """Before the commit: destroy the target, resume the source."""
    return _step(migration, "rollback", reason)
