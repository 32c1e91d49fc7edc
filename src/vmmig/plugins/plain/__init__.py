"""The ``plain`` technology: the unprotected baseline.

On ``qemu`` it is QEMU's own precopy migration (``migrate``,
``migrate-incoming``, ``query-migrate``), driven through vmmig's phases; on
``emu`` it is vmmig's precopy engine, whose agents read and write guest RAM
and registers directly, as a hypervisor may.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import ModuleType

from vmmig import hookimpl
from vmmig.migration import Migration
from vmmig.plugins.plain import emu_precopy, qemu_native
from vmmig.technology import Technology


#: Each platform's implementation of the steps, by the steps' names.
_BY_PLATFORM: dict[str, ModuleType] = {"qemu": qemu_native, "emu": emu_precopy}


#: Steps a platform may leave out (QEMU's stream stops the source and carries the CPUs).
_OPTIONAL = frozenset({"stop_source", "transfer_cpu_state"})


def _step(migration: Migration, name: str, *args: object) -> Awaitable[None] | None:
    module = _BY_PLATFORM[migration.plan.platform]
    if name in _OPTIONAL and not hasattr(module, name):
        return None
    return getattr(module, name)(migration, *args)  # type: ignore[no-any-return]


@hookimpl
def vmmig_technology() -> Technology:
    """Describe ``plain``."""
    return Technology(
        name="plain",
        summary="unprotected guests; on qemu, QEMU's own precopy migration; on emu, "
                "vmmig's precopy engine",
        platforms=("qemu", "emu"),
        features={"auto-converge", "bandwidth", "downtime-limit"},
        platform_features={"qemu": frozenset({"multifd"})},
    )


@hookimpl
def vmmig_prepare_target(migration: Migration) -> Awaitable[None] | None:
    """Start the target waiting for the incoming guest."""
    return _step(migration, "prepare_target")


@hookimpl
def vmmig_transfer_memory(migration: Migration) -> Awaitable[None] | None:
    """Move memory: QEMU's migration (memory and device state), or the engine's rounds."""
    return _step(migration, "transfer_memory")


@hookimpl
def vmmig_stop_source(migration: Migration) -> Awaitable[None] | None:
    """On emu: pause the source and send what is still dirty (QEMU does it itself)."""
    return _step(migration, "stop_source")


@hookimpl
def vmmig_transfer_cpu_state(migration: Migration) -> Awaitable[None] | None:
    """On emu: move the vCPU state (QEMU's stream carries it)."""
    return _step(migration, "transfer_cpu_state")


@hookimpl
def vmmig_verify_target(migration: Migration) -> Awaitable[None] | None:
    """Compare the paused guests and check the workload's invariant."""
    return _step(migration, "verify")


@hookimpl
def vmmig_finalize(migration: Migration) -> Awaitable[None] | None:
    """Resume the target, check the guest runs there, retire the source."""
    return _step(migration, "finalize")


@hookimpl
def vmmig_rollback(migration: Migration, reason: str) -> Awaitable[None] | None:
    """Destroy the target and its agents, keep the source running."""
    return _step(migration, "rollback", reason)
