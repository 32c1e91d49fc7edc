"""The migration state machine, driven by events alone (no processes, no sockets)."""

from __future__ import annotations

import pytest

from vmmig.core import events as ev
from vmmig.core.actions import Finish, RollBack, RunStep
from vmmig.core.machine import MigrationMachine
from vmmig.core.phases import TRANSITIONS, WORKING_PHASES, Phase
from vmmig.errors import IllegalTransition


def walk_to(phase: Phase) -> MigrationMachine:
    machine = MigrationMachine()
    machine.receive(ev.Start())
    while machine.phase is not phase:
        machine.receive(ev.StepDone())
    return machine


class TestHappyPath:
    def test_start_runs_the_first_step(self):
        """Start moves idle to preparing-target and asks for its step."""
        machine = MigrationMachine()
        assert machine.receive(ev.Start()) == RunStep(Phase.PREPARING_TARGET)

    def test_each_step_done_runs_the_next_phase_in_order(self):
        """StepDone walks every working phase in the documented order, then completes."""
        machine = MigrationMachine()
        actions = [machine.receive(ev.Start())]
        actions += [machine.receive(ev.StepDone()) for _ in WORKING_PHASES]
        assert actions == [*(RunStep(p) for p in WORKING_PHASES), Finish(Phase.COMPLETED)]
        assert machine.history == [Phase.IDLE, *WORKING_PHASES, Phase.COMPLETED]
        assert machine.done

    def test_commit_inside_finalizing_asks_for_nothing_new(self):
        """Committed keeps the phase and returns no action; the running step goes on."""
        machine = walk_to(Phase.FINALIZING)
        assert machine.receive(ev.Committed()) is None
        assert machine.phase is Phase.FINALIZING
        assert machine.committed


class TestFailure:
    @pytest.mark.parametrize("phase", WORKING_PHASES)
    def test_a_failed_step_rolls_back(self, phase):
        """A failure in any phase before commit asks for rollback with the reason."""
        machine = walk_to(phase)
        assert machine.receive(ev.StepFailed("target died")) == RollBack("target died")
        assert machine.phase is Phase.FAILING

    @pytest.mark.parametrize("phase", WORKING_PHASES)
    def test_cancel_rolls_back(self, phase):
        """A cancel in any phase before commit asks for rollback."""
        machine = walk_to(phase)
        assert machine.receive(ev.CancelRequested()) == RollBack("cancelled")

    def test_successful_rollback_ends_rolled_back(self):
        """RollbackDone ends in rolled-back, keeping the first failure's reason."""
        machine = walk_to(Phase.TRANSFERRING_MEMORY)
        machine.receive(ev.StepFailed("connection refused"))
        assert machine.receive(ev.RollbackDone()) == Finish(Phase.ROLLED_BACK,
                                                            "connection refused")

    def test_failed_rollback_ends_failed(self):
        """RollbackFailed ends in failed, and the reason keeps both failures."""
        machine = walk_to(Phase.PREPARING_TARGET)
        machine.receive(ev.StepFailed("boom"))
        assert machine.receive(ev.RollbackFailed("source gone")) == Finish(
            Phase.FAILED, "boom; source gone")

    def test_failure_after_commit_never_rolls_back(self):
        """After the commit point a failure ends failed: the source must not run again."""
        machine = walk_to(Phase.FINALIZING)
        machine.receive(ev.Committed())
        assert machine.receive(ev.StepFailed("guest not running")) == Finish(
            Phase.FAILED, "guest not running")

    def test_a_second_cancel_while_rolling_back_is_harmless(self):
        """Ctrl-C twice: the second one changes nothing and asks for nothing."""
        machine = walk_to(Phase.TRANSFERRING_MEMORY)
        machine.receive(ev.CancelRequested())
        assert machine.receive(ev.CancelRequested()) is None
        assert machine.phase is Phase.FAILING


class TestIllegalEvents:
    @pytest.mark.parametrize(("phase", "event"), [
        (Phase.IDLE, ev.StepDone()),
        (Phase.IDLE, ev.Committed()),
        (Phase.PREPARING_TARGET, ev.Start()),
        (Phase.TRANSFERRING_MEMORY, ev.Committed()),
        (Phase.TRANSFERRING_MEMORY, ev.RollbackDone()),
    ])
    def test_illegal_event_raises_and_changes_nothing(self, phase, event):
        """An event the table does not allow raises; phase and history are unchanged."""
        machine = walk_to(phase) if phase is not Phase.IDLE else MigrationMachine()
        history = list(machine.history)
        with pytest.raises(IllegalTransition):
            machine.receive(event)
        assert machine.phase is phase
        assert machine.history == history
        assert machine.failure is None

    def test_cancel_after_commit_is_refused(self):
        """Once committed, a cancel is illegal: it could fork the guest."""
        machine = walk_to(Phase.FINALIZING)
        machine.receive(ev.Committed())
        with pytest.raises(IllegalTransition):
            machine.receive(ev.CancelRequested())
        assert machine.phase is Phase.FINALIZING

    @pytest.mark.parametrize("phase", [Phase.COMPLETED, Phase.ROLLED_BACK, Phase.FAILED])
    def test_terminal_phases_accept_nothing(self, phase):
        """No event leads out of a terminal phase."""
        assert not [key for key in TRANSITIONS if key[0] is phase]
