"""The technology-neutral precopy policy: when to run another round, when to stop.

Sans-IO: the engine that moves pages reports each round here and is told
what to do next.  The rule is QEMU's (``migration_update_counters``): stop
the source when what is still dirty can be sent within the downtime limit
at the bandwidth measured so far, ``remaining <= bandwidth * downtime``;
otherwise run another round, up to a round cap, after which the source is
stopped anyway.  Round 1 sends every populated page; later rounds send the
pages dirtied during the previous one.

With auto-converge the policy also throttles the guest as QEMU does
(``mig_throttle_guest_down``): when a round dirtied more than half of what
it sent, for the second time, the vCPUs are slowed to 20 %, then 10 points
more each time it happens again, up to 99 %.
"""

from __future__ import annotations

import enum

import attrs


__all__ = ["THROTTLE_MAX", "Decision", "PrecopyLimits", "PrecopyPolicy", "Reason", "RoundResult",
           "pacing_delay"]


#: QEMU's defaults: cpu-throttle-initial, cpu-throttle-increment, max-cpu-throttle.
THROTTLE_INITIAL, THROTTLE_INCREMENT, THROTTLE_MAX = 20, 10, 99
#: How many fast-dirtying rounds trigger one throttle step (QEMU's dirty_rate_high_cnt).
THROTTLE_AFTER = 2


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen
class PrecopyLimits:
    """The plan's limits, in engine units.

    :ivar downtime_limit: seconds the guest may be stopped.
    :ivar max_rounds: stop the source after this many rounds even if not converged.
    :ivar bandwidth_cap: bytes per second at most; 0 for none.
    :ivar auto_converge: throttle the guest when it dirties memory too fast.
    """

    downtime_limit: float = attrs.field(validator=_positive)
    max_rounds: int = attrs.field(default=30, validator=attrs.validators.ge(1))
    bandwidth_cap: float = attrs.field(default=0.0, validator=attrs.validators.ge(0))
    auto_converge: bool = False


@attrs.frozen
class RoundResult:
    """What one round did.

    :ivar sent_bytes: bytes put on the channel in the round.
    :ivar seconds: how long the round took.
    :ivar dirty_pages: pages dirtied while it ran (the next round's work).
    """

    sent_bytes: int
    seconds: float
    dirty_pages: int


class Reason(enum.Enum):
    """Why the policy decided as it did."""

    #: More is dirty than fits in the downtime limit: go on.
    NOT_CONVERGED = "not-converged"
    #: What is dirty fits in the downtime limit.
    CONVERGED = "converged"
    #: The round cap was reached.
    ROUND_CAP = "round-cap"


@attrs.frozen
class Decision:
    """The policy's answer after a round.

    :ivar stop_source: True to pause the guest and send the rest (stop-and-copy).
    :ivar reason: why.
    :ivar bandwidth: the bandwidth estimate used, bytes per second.
    :ivar expected_downtime: seconds the remaining pages would take at that bandwidth.
    :ivar throttle: percent of the time the guest's vCPUs must sleep from now on.
    """

    stop_source: bool
    reason: Reason
    bandwidth: float
    expected_downtime: float
    throttle: int = 0


@attrs.define
class PrecopyPolicy:
    """Decides, round after round, whether precopy goes on.

    :param limits: the plan's limits.
    :param page_size: bytes a dirty page costs on the channel (payload and framing).
    """

    limits: PrecopyLimits
    page_size: int = 4096
    rounds: int = 0
    throttle: int = 0
    _sent: int = 0
    _seconds: float = 0.0
    _dirty_rate_high: int = 0

    def round_done(self, result: RoundResult) -> Decision:
        """Record a finished round and decide what comes next."""
        self.rounds += 1
        self._sent += result.sent_bytes
        self._seconds += result.seconds
        bandwidth = self.bandwidth
        remaining = result.dirty_pages * self.page_size
        if remaining == 0:
            expected = 0.0
        else:
            expected = remaining / bandwidth if bandwidth > 0 else float("inf")
        if expected <= self.limits.downtime_limit:
            reason = Reason.CONVERGED
        elif self.rounds >= self.limits.max_rounds:
            reason = Reason.ROUND_CAP
        else:
            reason = Reason.NOT_CONVERGED
            self._throttle_down(remaining, result.sent_bytes)
        return Decision(reason is not Reason.NOT_CONVERGED, reason, bandwidth, expected,
                        self.throttle)

    def _throttle_down(self, dirtied: int, sent: int) -> None:
        """QEMU's auto-converge: slow the guest once it outruns the transfer twice."""
        if not self.limits.auto_converge or dirtied * 2 <= sent:
            return
        self._dirty_rate_high += 1
        if self._dirty_rate_high >= THROTTLE_AFTER:
            self._dirty_rate_high = 0
            self.throttle = (THROTTLE_INITIAL if not self.throttle
                             else min(self.throttle + THROTTLE_INCREMENT, THROTTLE_MAX))

    @property
    def bandwidth(self) -> float:
        """Bytes per second measured over all rounds so far, capped by the plan."""
        measured = self._sent / self._seconds if self._seconds > 0 else 0.0
        cap = self.limits.bandwidth_cap
        return min(measured, cap) if cap else measured


def pacing_delay(sent_bytes: int, elapsed: float, bandwidth_cap: float) -> float:
    """Seconds to wait so that ``sent_bytes`` over ``elapsed`` stays within the cap.

    :return: 0 when under the cap or with no cap.
    """
    if not bandwidth_cap:
        return 0.0
    return max(0.0, sent_bytes / bandwidth_cap - elapsed)
