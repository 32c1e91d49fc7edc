"""The vmmig hook specifications: this module is the plugin reference.

A plugin is a module or object whose functions are marked with
:data:`vmmig.hookimpl` and named after the hooks below.  Built-in plugins
are listed in :data:`vmmig.plugin_host.BUILTIN_PLUGINS`; third-party plugins
register through the ``vmmig`` entry-point group::

    [project.entry-points.vmmig]
    snp = "vmmig_snp.plugin"

There are three kinds of hooks.

**Capability hook.**  A plugin that provides a *technology* (plain, sev,
sev-es, ...) answers :func:`vmmig_technology`.  Exactly one technology is
selected per migration (``--tech``); the step hooks of the other technology
plugins are not called for it.  Plugins that provide no technology (metrics,
UIs) see every call of every hook.

**Step hooks.**  One per working phase of the state machine
(:mod:`vmmig.core.phases`), plus rollback.  They are ``firstresult`` hooks
that return an *awaitable* (write them as ``async def``): the driver awaits
it, and the phase succeeds when it returns and fails when it raises.  A
technology may leave out the optional step hooks (``start_helper``,
``stop_source``, ``transfer_cpu_state``): that phase then does nothing for
it.  The other steps are required and checked before any VM is touched.

**Observer hooks.**  Called for every plugin, synchronously, with the
migration and what happened.  Keep them quick; they must not raise.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

import pluggy

from vmmig import PROJECT


if TYPE_CHECKING:
    from vmmig.config import MigrationPlan
    from vmmig.core.phases import Phase
    from vmmig.migration import Migration
    from vmmig.report import Progress, RoundReport
    from vmmig.technology import Technology


hookspec = pluggy.HookspecMarker(PROJECT)


# -- capability hook ---------------------------------------------------------


@hookspec
def vmmig_technology() -> Technology | None:
    """Describe the technology this plugin provides, if any.

    Called once at start-up for ``vmmig plugins`` and to select ``--tech``.

    :return: a :class:`~vmmig.technology.Technology` naming the technology,
        the platforms it runs on and its features; ``None`` (or no
        implementation) for plugins that provide no technology.
    """


@hookspec(firstresult=True)
def vmmig_host_problems(plan: MigrationPlan) -> list[str] | None:
    """Say what this host lacks to run the plan with this plugin's technology.

    Called for the selected technology only, before any VM starts, and
    before its ``unavailable`` reason is reported: a user learns what the
    host lacks even where the technology is not finished.

    :param plan: the validated plan (its platform, technology and sizes).
    :return: one line per missing requirement, naming it; empty or ``None``
        when nothing is missing.
    """


# -- step hooks (the selected technology only) --------------------------------


@hookspec(firstresult=True)
def vmmig_prepare_target(migration: Migration) -> Awaitable[None] | None:
    """Create the target VM and make it ready to receive (phase ``preparing-target``).

    Called once the source VM exists (``migration.source``).  Set
    ``migration.target``.  For confidential technologies this is where the
    target is attested and receives its secrets.  Required.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_start_helper(migration: Migration) -> Awaitable[None] | None:
    """Start the helper vCPUs that run the Migration Handler (phase ``starting-helper``).

    Optional: technologies without a guest-side helper leave it out.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_transfer_memory(migration: Migration) -> Awaitable[None] | None:
    """Move guest memory while the guest runs (phase ``transferring-memory``).

    Runs the precopy rounds until they converge (or hit their cap) and
    reports them through :func:`vmmig_round_done` and :func:`vmmig_progress`
    via ``migration.round_done()`` / ``migration.progress()``.  Return once
    the source may be stopped.  Required.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_stop_source(migration: Migration) -> Awaitable[None] | None:
    """Pause the source guest and send what it dirtied last (phase ``stopping-source``).

    Downtime starts here.  Optional: a technology whose memory transfer
    already stopped the source (QEMU's own migration does) leaves it out.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_transfer_cpu_state(migration: Migration) -> Awaitable[None] | None:
    """Move registers and device state to the target (phase ``transferring-cpu-state``).

    Optional: a technology whose memory stream already carries CPU state
    leaves it out.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_verify_target(migration: Migration) -> Awaitable[None] | None:
    """Check that the stopped target holds exactly the stopped source's guest (``verifying``).

    Both sides are paused.  A technology compares guest memory (or has the
    guest compute digests it can trust) and CPU state, checks the
    workload's own invariants, and records each result with
    ``migration.record_check(name, detail, ok=...)``.  Any failed check
    fails the phase, and the migration rolls back.  Required.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_finalize(migration: Migration) -> Awaitable[None] | None:
    """Commit: the target resumes and the source is retired (phase ``finalizing``).

    Call ``migration.commit()`` at the point after which the source must
    never run again; a failure before it rolls back, after it does not.
    Required.

    :param migration: the migration in progress.
    :return: an awaitable; the phase fails if it raises.
    """


@hookspec(firstresult=True)
def vmmig_rollback(migration: Migration, reason: str) -> Awaitable[None] | None:
    """Undo a migration that failed or was cancelled before commit (phase ``failing``).

    Destroy the target (if any) and make sure the source runs again, intact.
    Must cope with any earlier phase having been interrupted.  Required.

    :param migration: the migration in progress.
    :param reason: why the migration is being rolled back.
    :return: an awaitable; if it raises, the migration ends ``failed``.
    """


# -- observer hooks (every plugin) -------------------------------------------


@hookspec
def vmmig_phase_changed(migration: Migration, old: Phase, new: Phase) -> None:
    """The migration moved from phase ``old`` to phase ``new``.

    :param migration: the migration.
    :param old: the phase it left.
    :param new: the phase it entered.
    """


@hookspec
def vmmig_round_done(migration: Migration, round_: RoundReport) -> None:
    """A precopy round (QEMU: a dirty-sync pass) finished.

    :param migration: the migration.
    :param round_: what the round moved and how fast.
    """


@hookspec
def vmmig_progress(migration: Migration, progress: Progress) -> None:
    """Periodic progress while memory moves (a few times a second).

    :param migration: the migration.
    :param progress: transferred, remaining and total bytes, rate, pass.
    """
