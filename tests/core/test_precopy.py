"""The precopy policy: QEMU's convergence rule, the round cap, the bandwidth cap."""

from __future__ import annotations

import pytest

from vmmig.core.precopy import PrecopyLimits, PrecopyPolicy, Reason, RoundResult, pacing_delay


MIB = 1 << 20


def policy(**limits):
    return PrecopyPolicy(PrecopyLimits(**{"downtime_limit": 0.3, **limits}))


class TestConvergence:
    def test_stops_when_remaining_fits_in_the_downtime_limit(self):
        """remaining <= bandwidth x downtime: stop the source (QEMU's rule)."""
        # 1 GiB in 1 s is 1 GiB/s; 300 ms of it is 300 MiB; 256 MiB dirty fits.
        decision = policy().round_done(RoundResult(1 << 30, 1.0, (256 * MIB) // 4096))
        assert decision.stop_source
        assert decision.reason is Reason.CONVERGED
        assert decision.expected_downtime == pytest.approx(0.25)

    def test_goes_on_while_remaining_is_too_large(self):
        """More dirty than bandwidth x downtime: another round."""
        decision = policy().round_done(RoundResult(1 << 30, 1.0, (400 * MIB) // 4096))
        assert not decision.stop_source
        assert decision.reason is Reason.NOT_CONVERGED

    def test_bandwidth_is_measured_over_all_rounds(self):
        """The estimate is total bytes over total time, not the last round's alone."""
        p = policy()
        p.round_done(RoundResult(900 * MIB, 1.0, 10**6))
        decision = p.round_done(RoundResult(100 * MIB, 1.0, 0))
        assert decision.bandwidth == pytest.approx(500 * MIB)

    def test_round_cap_stops_a_non_converging_migration(self):
        """After max_rounds the source is stopped anyway, and the reason says so."""
        p = policy(max_rounds=3)
        decisions = [p.round_done(RoundResult(MIB, 1.0, 10**6)) for _ in range(3)]
        assert [d.stop_source for d in decisions] == [False, False, True]
        assert decisions[-1].reason is Reason.ROUND_CAP

    def test_nothing_dirty_converges_even_without_a_measurement(self):
        """A round that sent nothing and left nothing dirty has converged."""
        assert policy().round_done(RoundResult(0, 0.0, 0)).stop_source


class TestBandwidthCap:
    def test_cap_limits_the_estimate(self):
        """The plan's cap bounds the bandwidth used for the convergence rule."""
        p = policy(bandwidth_cap=100 * MIB)
        decision = p.round_done(RoundResult(1 << 30, 1.0, (40 * MIB) // 4096))
        assert decision.bandwidth == 100 * MIB
        assert not decision.stop_source  # 40 MiB needs 0.4 s at 100 MiB/s

    @pytest.mark.parametrize(("sent", "elapsed", "cap", "delay"), [
        (100 * MIB, 0.5, 100 * MIB, 0.5),
        (100 * MIB, 2.0, 100 * MIB, 0.0),
        (100 * MIB, 0.1, 0, 0.0),
    ])
    def test_pacing_delay(self, sent, elapsed, cap, delay):
        """The pacer waits just long enough to stay within the cap, never with no cap."""
        assert pacing_delay(sent, elapsed, cap) == pytest.approx(delay)


class TestLimits:
    @pytest.mark.parametrize("limits", [
        {"downtime_limit": 0}, {"downtime_limit": 0.3, "max_rounds": 0},
        {"downtime_limit": 0.3, "bandwidth_cap": -1},
    ])
    def test_bad_limits_are_refused(self, limits):
        """Limits are validated when they are made."""
        with pytest.raises(ValueError, match="must be"):
            PrecopyLimits(**limits)


class TestAutoConverge:
    """QEMU's auto-converge: throttle a guest that keeps outrunning the transfer."""

    def fast_dirtier_round(self):
        # Sent 100 MiB in 1 s and the guest dirtied 100 MiB meanwhile: never fits.
        return RoundResult(100 * MIB, 1.0, (100 * MIB) // 4096)

    def test_off_by_default(self):
        """Without auto-converge the guest is never throttled."""
        p = policy()
        decisions = [p.round_done(self.fast_dirtier_round()) for _ in range(10)]
        assert {d.throttle for d in decisions} == {0}

    def test_throttles_after_two_fast_rounds_then_steps_up_to_99(self):
        """20 % after the second fast round, +10 every second one after, capped at 99 %."""
        p = policy(auto_converge=True, max_rounds=100)
        throttles = [p.round_done(self.fast_dirtier_round()).throttle for _ in range(24)]
        assert throttles[:6] == [0, 20, 20, 30, 30, 40]
        assert throttles[-1] == 99
        assert max(throttles) == 99

    def test_a_guest_dirtying_less_than_half_what_was_sent_is_not_throttled(self):
        """Dirtying slower than half the transfer rate is QEMU's 'fine' case."""
        p = policy(auto_converge=True, downtime_limit=0.001)
        for _ in range(5):
            decision = p.round_done(RoundResult(100 * MIB, 1.0, (40 * MIB) // 4096))
        assert decision.throttle == 0
        assert decision.reason is Reason.NOT_CONVERGED
