"""The phases of one migration and the table of legal transitions.

Rule 1 (after h11): everything that decides which phase follows which lives
in this file, as data.  Rule 2: the table knows nothing about technologies;
a technology only supplies what happens inside a phase.

The happy path walks the working phases in order::

    idle -> preparing-target -> starting-helper -> transferring-memory
         -> stopping-source -> transferring-cpu-state -> verifying
         -> finalizing -> completed

``verifying`` is not in the original design: integrity is checked while
both sides are still stopped, so that a mismatch can still roll back to the
source instead of leaving a corrupt guest running on the target.

A failure or cancel in any working phase goes to ``failing``, where the
technology rolls back; that ends in ``rolled-back`` (the source runs again)
or ``failed`` (rollback itself failed).  Once the target has committed
(``finalizing`` after the commit point), a failure goes straight to
``failed``: the source must never run again, or the guest would fork.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from vmmig.core import events as ev


__all__ = ["TERMINAL_PHASES", "TRANSITIONS", "WORKING_PHASES", "Phase"]


class Phase(enum.Enum):
    """A migration phase; values are the names shown to users and in reports."""

    #: Nothing has happened yet.
    IDLE = "idle"
    #: The target VM is being created and made ready to receive.
    PREPARING_TARGET = "preparing-target"
    #: Helper vCPUs (the Migration Handler's) start on both sides.
    STARTING_HELPER = "starting-helper"
    #: Precopy rounds move memory while the guest keeps running.
    TRANSFERRING_MEMORY = "transferring-memory"
    #: The source guest is paused; downtime starts here.
    STOPPING_SOURCE = "stopping-source"
    #: Registers and device state move to the target.
    TRANSFERRING_CPU_STATE = "transferring-cpu-state"
    #: Both sides are stopped; guest memory and state are compared.
    VERIFYING = "verifying"
    #: The target commits and resumes; the source is retired.
    FINALIZING = "finalizing"
    #: Done: the guest runs on the target only.
    COMPLETED = "completed"
    #: Something failed; the technology is rolling back.
    FAILING = "failing"
    #: Rolled back: the target is gone and the source runs again.
    ROLLED_BACK = "rolled-back"
    #: Failed without a clean rollback (or after the commit point).
    FAILED = "failed"


#: Phases in which the technology is working; each runs one step.
WORKING_PHASES: Final = (
    Phase.PREPARING_TARGET,
    Phase.STARTING_HELPER,
    Phase.TRANSFERRING_MEMORY,
    Phase.STOPPING_SOURCE,
    Phase.TRANSFERRING_CPU_STATE,
    Phase.VERIFYING,
    Phase.FINALIZING,
)

#: Phases after which no event is accepted.
TERMINAL_PHASES: Final = frozenset({Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FAILED})


def _build_table() -> Mapping[tuple[Phase, type[ev.Event]], Phase]:
    table: dict[tuple[Phase, type[ev.Event]], Phase] = {(Phase.IDLE, ev.Start): WORKING_PHASES[0]}
    successors = (*WORKING_PHASES[1:], Phase.COMPLETED)
    for phase, successor in zip(WORKING_PHASES, successors, strict=True):
        table[phase, ev.StepDone] = successor
        table[phase, ev.StepFailed] = Phase.FAILING
        table[phase, ev.CancelRequested] = Phase.FAILING
    # Committing keeps the phase; the machine remembers that rollback is over.
    table[Phase.FINALIZING, ev.Committed] = Phase.FINALIZING
    table[Phase.FAILING, ev.RollbackDone] = Phase.ROLLED_BACK
    table[Phase.FAILING, ev.RollbackFailed] = Phase.FAILED
    # A second Ctrl-C while rolling back changes nothing but is not an error.
    table[Phase.FAILING, ev.CancelRequested] = Phase.FAILING
    return MappingProxyType(table)


#: ``(phase, event type) -> next phase``: every legal transition.
TRANSITIONS: Final = _build_table()
