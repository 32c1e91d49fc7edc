"""Terminal progress, as libvirt shows it: ``Migration: [ 45.12 %]`` plus figures.

Only when standard error is a terminal; quiet otherwise (logs, CI, pipes).
"""

from __future__ import annotations

import sys
from typing import TextIO

from vmmig import hookimpl
from vmmig.core.phases import Phase
from vmmig.integrity import human_size
from vmmig.migration import Migration
from vmmig.report import Progress


def format_progress(progress: Progress) -> str:
    """One progress line: percent, transferred/total, rate, pass."""
    return (f"Migration: [{progress.percent:5.2f} %] {human_size(progress.transferred)} sent, "
            f"{human_size(progress.remaining)} of {human_size(progress.total)} left, "
            f"{progress.mbps / 8:.0f} MB/s, pass {progress.pass_}")


def _stream() -> TextIO | None:
    return sys.stderr if sys.stderr.isatty() else None


@hookimpl
def vmmig_progress(migration: Migration, progress: Progress) -> None:
    """Redraw the progress line."""
    if (stream := _stream()) is not None:
        stream.write("\r\x1b[K" + format_progress(progress))
        stream.flush()


@hookimpl
def vmmig_phase_changed(migration: Migration, old: Phase, new: Phase) -> None:
    """End the progress line when memory transfer ends."""
    if old is Phase.TRANSFERRING_MEMORY and (stream := _stream()) is not None:
        stream.write("\n")
        stream.flush()
