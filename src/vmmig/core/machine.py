"""The migration state machine: events in, actions out, no I/O.

The driver (:mod:`vmmig.runner`) feeds it events and performs the actions it
returns.  An illegal event raises :class:`~vmmig.errors.IllegalTransition`
and leaves the machine exactly as it was.
"""

from __future__ import annotations

import attrs

from vmmig.core import events as ev
from vmmig.core.actions import Action, Finish, RollBack, RunStep
from vmmig.core.phases import TERMINAL_PHASES, TRANSITIONS, WORKING_PHASES, Phase
from vmmig.errors import IllegalTransition


__all__ = ["MigrationMachine"]


@attrs.define
class MigrationMachine:
    """Tracks one migration's phase.

    :ivar phase: the current phase.
    :ivar committed: True once the target has committed; rollback is then impossible.
    :ivar failure: the first failure's reason, if any.
    """

    phase: Phase = Phase.IDLE
    committed: bool = False
    failure: str | None = None
    history: list[Phase] = attrs.Factory(lambda: [Phase.IDLE])

    def receive(self, event: ev.Event) -> Action | None:
        """Apply ``event`` and return what the driver must do next.

        ``None`` means nothing new: the event did not change the phase (a
        commit inside ``finalizing``, a repeated cancel while rolling back).
        """
        next_phase = TRANSITIONS.get((self.phase, type(event)))
        if next_phase is None or (self.committed and isinstance(event, ev.CancelRequested)):
            # After the commit point a cancel can no longer be honoured.
            raise IllegalTransition(self.phase, event)
        if next_phase is Phase.FAILING and self.committed:
            next_phase = Phase.FAILED
        changed = next_phase is not self.phase
        self._enter(next_phase, event)
        return self._action_for() if changed else None

    @property
    def done(self) -> bool:
        """True in a terminal phase."""
        return self.phase in TERMINAL_PHASES

    def _enter(self, phase: Phase, event: ev.Event) -> None:
        if isinstance(event, ev.Committed):
            self.committed = True
        if isinstance(event, ev.RollbackFailed) and self.failure is not None:
            # Both matter: why the migration failed and why the source was not resumed.
            self.failure = f"{self.failure}; {event.reason}"
        elif self.failure is None:
            if isinstance(event, ev.StepFailed | ev.RollbackFailed):
                self.failure = event.reason
            elif isinstance(event, ev.CancelRequested):
                self.failure = "cancelled"
        if phase is not self.phase:
            self.phase = phase
            self.history.append(phase)

    def _action_for(self) -> Action:
        if self.phase in WORKING_PHASES:
            return RunStep(self.phase)
        if self.phase is Phase.FAILING:
            return RollBack(self.failure or "failed")
        return Finish(self.phase, self.failure)
