"""The object every hook receives: one migration in progress.

It holds the plan, the VMs as the platform gives them, a per-technology
scratch space, and the statistics the report is built from.  Hooks report
progress through it, which relays to the observer hooks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs

from vmmig.config import MigrationPlan
from vmmig.report import IntegrityReport, Progress, RamStats, RoundReport


__all__ = ["Migration"]


@attrs.define(eq=False)
class Migration:
    """One migration in progress.

    :ivar plan: the validated plan.
    :ivar platform: the platform object (``vmmig.platforms.*``) that runs the VMs.
    :ivar source: the source VM handle, as the platform defines it.
    :ivar target: the target VM handle, set by the ``prepare_target`` step.
    :ivar scratch: the technology's own state between its hooks.
    :ivar ram: the latest memory-transfer statistics.
    :ivar downtime_ms: the guest's downtime, once known.
    :ivar downtime_parts: its parts by what they moved or did.
    :ivar setup_ms: time before the first round started, once known.
    :ivar on_round: set by the driver: relays rounds to the observer hooks.
    :ivar on_progress: set by the driver: relays progress to the observer hooks.
    :ivar on_commit: set by the driver: records the commit point.
    """

    plan: MigrationPlan
    platform: Any
    source: Any = None
    target: Any = None
    log: logging.Logger = attrs.field(factory=lambda: logging.getLogger("vmmig.migration"))
    scratch: dict[str, Any] = attrs.Factory(dict)
    ram: RamStats = attrs.Factory(RamStats)
    downtime_ms: int | None = None
    #: What ``downtime_ms`` was spent on, e.g. ``{"memory": 80, "cpu-state": 3}``.
    downtime_parts: dict[str, int] = attrs.Factory(dict)
    setup_ms: int | None = None
    started: float = attrs.Factory(time.monotonic)
    checks: dict[str, str] = attrs.Factory(dict)
    failures: list[str] = attrs.Factory(list)
    on_round: Callable[[RoundReport], None] = lambda _round: None
    on_progress: Callable[[Progress], None] = lambda _progress: None
    on_commit: Callable[[], None] = lambda: None

    def round_done(self, round_: RoundReport) -> None:
        """Report a finished precopy round to the observers."""
        self.on_round(round_)

    def progress(self, progress: Progress) -> None:
        """Report transfer progress to the observers."""
        self.on_progress(progress)

    def record_check(self, name: str, detail: str, *, ok: bool = True) -> None:
        """Record one integrity check's result (failed checks fail the run)."""
        self.checks[name] = detail
        if not ok:
            self.failures.append(f"{name}: {detail}")

    @property
    def integrity(self) -> IntegrityReport:
        """The integrity checks recorded so far."""
        return IntegrityReport(dict(self.checks), tuple(self.failures))

    def commit(self) -> None:
        """Declare the commit point: from now on the source must never run again."""
        self.on_commit()
