"""Guest workloads: which program a test VM runs and how its invariant is checked.

``ab`` increments byte 0 of every page in turn (QEMU's migration-test idea):
its memory obeys the a-b edge rule and keeps changing while it runs.
``idle`` sets up and halts: its memory never changes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from vmmig.errors import ConfigError, PlatformError
from vmmig.guests.ab_check import ab_passes, ab_region, check_ab_heads
from vmmig.integrity import RamScan


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = [
    "GUEST_WORKLOADS",
    "check_workload",
    "guest_image_name",
    "wait_guest_progress",
    "wait_workload_ready",
]

#: Workloads a boot-sector guest can run, by name.
GUEST_WORKLOADS: Final = ("ab", "idle")

#: How long a resumed guest gets to show it runs.
PROGRESS_TIMEOUT = 30.0
#: How long a booted guest gets to finish its first pass over memory.
READY_TIMEOUT = 120.0
_POLL = 0.05


def guest_image_name(workload: str) -> str:
    """The guest program that runs ``workload``.

    :raises ConfigError: for a workload this kind of guest cannot run.
    """
    if workload not in GUEST_WORKLOADS:
        raise ConfigError("workload", f"{workload!r} is not available here; "
                          f"choose one of: {', '.join(GUEST_WORKLOADS)}")
    return workload


def check_workload(workload: str, scan: RamScan) -> tuple[str, str, bool]:
    """Check the workload's own invariant on a stopped guest's scanned memory.

    :return: (check name, one-line detail, ok).
    """
    if workload == "ab":
        region = ab_region(scan.first_page, scan.size)
        result = check_ab_heads(scan.page_heads, region)
        return "a-b", result.detail, result.ok
    return "workload", f"{workload}: no invariant to check", True


async def wait_guest_progress(workload: str, memory: Buffer,
                              status: Callable[[], Awaitable[str]]) -> tuple[bool, str]:
    """Wait until a resumed guest shows it runs.

    For ``ab`` its memory must change; every workload must be ``running``.

    :return: (ok, one-line detail).
    """
    if (state := await status()) != "running":
        return False, f"guest is {state!r}, not running"
    if workload != "ab":
        return True, "guest running"
    start, end = ab_region(memory)
    view = memoryview(memory).cast("B")
    before = bytes(view[start:end:4096])
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    while time.monotonic() < deadline:
        await asyncio.sleep(_POLL)
        if bytes(view[start:end:4096]) != before:
            return True, "guest running, memory changing"
    return False, f"guest memory unchanged for {PROGRESS_TIMEOUT:.0f} s after resume"


async def wait_workload_ready(workload: str, memory: Buffer) -> None:
    """Wait until a booted guest's memory obeys its workload's rule.

    ``ab`` zeroes its pages first, so its rule holds only once it has
    completed a pass; migrating earlier would compare firmware leftovers.

    :raises PlatformError: when the guest does not get there in time.
    """
    if workload != "ab":
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while ab_passes(memory) < 1:
        if time.monotonic() > deadline:
            raise PlatformError(f"the ab guest did not finish a pass over its memory within "
                                f"{READY_TIMEOUT:.0f} s")
        await asyncio.sleep(_POLL)
