"""The step hooks of the technologies whose guests migrate under their Migration Handler.

``sev`` and ``sev-es`` share them (each plugin module re-exports these
functions): on ``emu`` the steps are :mod:`.emu_mh`'s, or :mod:`.emu_psp`'s
for ``--strategy psp``; what differs between the two technologies (who
moves the registers) is decided inside the steps, by the plan's technology.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import ModuleType

from vmmig import hookimpl
from vmmig.errors import UnsupportedError
from vmmig.migration import Migration
from vmmig.plugins.sev import emu_mh, emu_psp


__all__ = ["vmmig_finalize", "vmmig_prepare_target", "vmmig_rollback", "vmmig_start_helper",
           "vmmig_stop_source", "vmmig_transfer_cpu_state", "vmmig_transfer_memory",
           "vmmig_verify_target"]


#: Each strategy's implementation of the steps on emu, by the steps' names.
_BY_STRATEGY: dict[str, ModuleType] = {"mh": emu_mh, "psp": emu_psp}


def _step(migration: Migration, name: str, *args: object) -> Awaitable[None] | None:
    if migration.plan.platform != "emu":
        raise UnsupportedError(f"{migration.plan.tech} migrates on emu only; "
                               f"{migration.plan.platform} lacks the Migration Handler")
    module = _BY_STRATEGY[migration.plan.strategy]
    if name == "start_helper" and not hasattr(module, name):  # the PSP has no helper vCPU
        return None
    return getattr(module, name)(migration, *args)  # type: ignore[no-any-return]


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
