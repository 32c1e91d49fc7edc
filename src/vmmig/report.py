"""Progress, round and final reports, in QEMU's ``query-migrate`` vocabulary.

Sizes are bytes, times milliseconds, ``mbps`` megabits per second and
``dirty-pages-rate`` pages per second, as in QEMU's ``MigrationInfo``.
``duplicate`` counts zero pages (QEMU's name for them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

import attrs


__all__ = [
    "IntegrityReport",
    "MigrationReport",
    "Progress",
    "RamStats",
    "RoundReport",
]


@attrs.frozen
class Progress:
    """A snapshot of an ongoing memory transfer."""

    transferred: int
    remaining: int
    total: int
    mbps: float
    pass_: int

    @property
    def percent(self) -> float:
        """libvirt's figure: 100 - remaining*100/total, capped below 100 until done."""
        if self.total <= 0:
            return 0.0
        return min(99.99, max(0.0, 100.0 - self.remaining * 100.0 / self.total))


@attrs.frozen
class RoundReport:
    """One precopy round (QEMU: one dirty-bitmap sync pass)."""

    number: int
    transferred: int
    remaining: int
    dirty_pages_rate: int


@attrs.frozen
class RamStats:
    """The ``ram`` object of the report."""

    transferred: int = 0
    total: int = 0
    remaining: int = 0
    normal: int = 0
    duplicate: int = 0
    normal_bytes: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    dirty_sync_count: int = 0
    page_size: int = 4096

    @classmethod
    def from_qmp(cls, ram: Mapping[str, Any]) -> RamStats:
        """Build from QEMU's ``query-migrate`` ``ram`` object."""
        return cls(
            transferred=int(ram.get("transferred", 0)),
            total=int(ram.get("total", 0)),
            remaining=int(ram.get("remaining", 0)),
            normal=int(ram.get("normal", 0)),
            duplicate=int(ram.get("duplicate", 0)),
            normal_bytes=int(ram.get("normal-bytes", 0)),
            dirty_pages_rate=int(ram.get("dirty-pages-rate", 0)),
            mbps=float(ram.get("mbps", 0.0)),
            dirty_sync_count=int(ram.get("dirty-sync-count", 0)),
            page_size=int(ram.get("page-size", 4096)),
        )

    def to_json(self) -> dict[str, Any]:
        """The QEMU-named dictionary."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in attrs.fields(RamStats)}


@attrs.frozen
class IntegrityReport:
    """What the verifying phase found.

    :ivar ok: True when every check passed.
    :ivar checks: check name -> one-line result (e.g. ``"memory": "1 GiB identical"``).
    :ivar failures: the failed checks' one-line reasons.
    """

    checks: Mapping[str, str] = attrs.field(factory=dict)
    failures: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.failures


Status = Literal["completed", "failed", "cancelled"]


@attrs.frozen
class MigrationReport:
    """The final report of one migration, written by every platform and technology."""

    status: Status
    technology: str
    platform: str
    total_time: int
    downtime: int | None
    setup_time: int
    ram: RamStats
    phases: Mapping[str, int]
    integrity: IntegrityReport | None = None
    error: str | None = None
    source: str = "unknown"
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    #: What the downtime was spent on, in ms (``memory``, ``cpu-state``, ``commit``).
    downtime_parts: Mapping[str, int] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The report as QEMU-vocabulary JSON data."""
        data: dict[str, Any] = {
            "status": self.status,
            "technology": self.technology,
            "platform": self.platform,
            "integrity": "not-checked" if self.integrity is None
            else ("ok" if self.integrity.ok else "failed"),
            "total-time": self.total_time,
            "downtime": self.downtime,
            "setup-time": self.setup_time,
            "ram": self.ram.to_json(),
            "phases": dict(self.phases),
            "source-vm": self.source,
        }
        if self.downtime_parts:
            data["downtime-parts"] = dict(self.downtime_parts)
        if self.integrity is not None:
            data["integrity-details"] = {
                "checks": dict(self.integrity.checks),
                "failures": list(self.integrity.failures),
            }
        if self.error is not None:
            data["error-desc"] = self.error
        data.update(self.extra)
        return data

    def dumps(self) -> str:
        """The report as indented JSON text."""
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"
