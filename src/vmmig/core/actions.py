"""Actions the migration state machine asks its driver to perform (outputs)."""

from __future__ import annotations

import attrs

from vmmig.core.phases import Phase


__all__ = ["Action", "Finish", "RollBack", "RunStep"]


@attrs.frozen
class Action:
    """Base of all actions."""


@attrs.frozen
class RunStep(Action):
    """Run the step of ``phase`` (a technology hook), then report StepDone/StepFailed."""

    phase: Phase


@attrs.frozen
class RollBack(Action):
    """Undo what the technology did: destroy the target, resume the source."""

    reason: str


@attrs.frozen
class Finish(Action):
    """The migration is over in ``phase`` (a terminal phase)."""

    phase: Phase
    reason: str | None = None
