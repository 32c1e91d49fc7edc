"""The ``plain`` technology: the unprotected baseline.

On ``qemu`` it is QEMU's own precopy migration (``migrate``,
``migrate-incoming``, ``query-migrate``), driven through vmmig's phases.
"""

from __future__ import annotations

from collections.abc import Awaitable

from vmmig import hookimpl
from vmmig.migration import Migration
from vmmig.plugins.plain import qemu_native
from vmmig.technology import Technology


@hookimpl
def vmmig_technology() -> Technology:
    """Describe ``plain``."""
    return Technology(
        name="plain",
        summary="unprotected guests; on qemu, QEMU's own precopy migration",
        platforms=("qemu",),
        features={"auto-converge", "multifd", "bandwidth", "downtime-limit"},
    )


@hookimpl
def vmmig_prepare_target(migration: Migration) -> Awaitable[None]:
    """Start the target QEMU waiting for the incoming stream."""
    return qemu_native.prepare_target(migration)


@hookimpl
def vmmig_transfer_memory(migration: Migration) -> Awaitable[None]:
    """Run QEMU's migration (memory and device state) to completion."""
    return qemu_native.transfer(migration)


@hookimpl
def vmmig_verify_target(migration: Migration) -> Awaitable[None]:
    """Compare the paused guests and check the workload's invariant."""
    return qemu_native.verify(migration)


@hookimpl
def vmmig_finalize(migration: Migration) -> Awaitable[None]:
    """Resume the target, check the guest runs there, retire the source."""
    return qemu_native.finalize(migration)


@hookimpl
def vmmig_rollback(migration: Migration, reason: str) -> Awaitable[None]:
    """Cancel QEMU's migration, destroy the target, keep the source running."""
    return qemu_native.rollback(migration, reason)
