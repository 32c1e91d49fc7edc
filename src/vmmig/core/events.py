"""Events fed into the migration state machine (inputs, frozen data)."""

from __future__ import annotations

import attrs


__all__ = [
    "CancelRequested",
    "Committed",
    "Event",
    "RollbackDone",
    "RollbackFailed",
    "Start",
    "StepDone",
    "StepFailed",
]


@attrs.frozen
class Event:
    """Base of all state-machine events."""


@attrs.frozen
class Start(Event):
    """Begin the migration."""


@attrs.frozen
class StepDone(Event):
    """The current phase's step finished successfully."""


@attrs.frozen
class StepFailed(Event):
    """The current phase's step failed.

    :param reason: one line for the user, naming what failed.
    """

    reason: str


@attrs.frozen
class CancelRequested(Event):
    """The user asked to cancel (Ctrl-C, ``migrate_cancel``)."""


@attrs.frozen
class Committed(Event):
    """The target took ownership of the guest; the source may never run again."""


@attrs.frozen
class RollbackDone(Event):
    """The technology rolled back: the target is gone, the source runs."""


@attrs.frozen
class RollbackFailed(Event):
    """Rollback itself failed.

    :param reason: what could not be undone.
    """

    reason: str
