"""The PSP's modelled cost, and optional pacing to make benchmarks feel it.

ASSUMPTIONS.  No published figure exists for the PSP's command latency or
its SEND/RECEIVE_UPDATE_DATA throughput (research notes, section 4: only
"far too slow" (Google), "bandwidth is limited" (IBM), "very slow because
API communication between x86 and PSP is time-consuming" (Hygon), and AMD
raising QEMU's downtime limit to 1 s for SEV).  The defaults are therefore
assumptions, chosen to be plausible and easy to override:

- ``latency_per_command_us = 15``: a command is a mailbox round trip to an
  ARM co-processor (write the command buffer address, ring the doorbell,
  wait for the interrupt) plus the firmware's own checks; tens of
  microseconds is the order of magnitude of such device round trips.
- ``bytes_per_second = 50e6`` (50 MB/s): per byte the firmware runs AES-CTR
  and HMAC-SHA256 on a shared crypto engine and copies through its small
  private SRAM one command at a time.  50 MB/s makes PSP export of 1 GiB
  take ~21 s, slow enough to match "far too slow" for live migration, while
  staying within what an embedded crypto engine does.

The per-byte cost applies to every command that moves guest data
(LAUNCH_UPDATE_DATA/_VMSA, LAUNCH_SECRET, SEND/RECEIVE_UPDATE_DATA/_VMSA);
every command pays the latency.

The PSP does not sleep by default: it adds each command's modelled time to
``Psp.modelled_seconds``.  With ``pace=True`` a :class:`Pacer` makes the
caller wait so that commands take at least their modelled time on average.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

import attrs


__all__ = ["Pacer", "PspCostModel"]

#: Shorter waits are carried over: ``time.sleep`` cannot sleep a few microseconds.
MIN_SLEEP_SECONDS: Final = 0.001


def _finite(
    minimum: float, *, strict: bool
) -> Callable[[object, attrs.Attribute[float], float], None]:
    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        too_small = value <= minimum if strict else value < minimum
        if not math.isfinite(value) or too_small:
            bound = ">" if strict else ">="
            raise ValueError(f"{attribute.name} must be finite and {bound} {minimum}, got {value}")

    return check


@attrs.frozen
class PspCostModel:
    """Modelled PSP cost: a fixed latency per command plus a per-byte cost.

    Defaults are assumptions (module docstring says why).
    """

    latency_per_command_us: float = attrs.field(default=15.0, validator=_finite(0.0, strict=False))
    bytes_per_second: float = attrs.field(default=50e6, validator=_finite(0.0, strict=True))

    def seconds(self, nbytes: int = 0) -> float:
        """The modelled time of one command moving ``nbytes`` bytes of guest data."""
        return self.latency_per_command_us * 1e-6 + nbytes / self.bytes_per_second


class Pacer:
    """Makes a series of commands last at least their modelled time.

    The PSP is one serial resource: a command cannot finish before
    ``max(its start, the previous command's modelled end) + its cost``.
    Real work that already took longer than modelled is not charged twice;
    waits under :data:`MIN_SLEEP_SECONDS` accumulate until they are worth a
    ``sleep``, so the average rate is right even for 15-microsecond commands.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._due = -math.inf

    def wait(self, started: float, seconds: float) -> None:
        """Wait until a command begun at ``started`` (by the pacer's clock) is due."""
        self._due = max(self._due, started) + seconds
        ahead = self._due - self._clock()
        if ahead >= MIN_SLEEP_SECONDS:
            self._sleep(ahead)

    def now(self) -> float:
        """The pacer's clock."""
        return self._clock()
