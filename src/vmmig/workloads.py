"""Guest workloads: which program a test VM runs and how its invariant is checked.

``ab`` increments byte 0 of every page in turn (QEMU's migration-test idea):
its memory obeys the a-b edge rule and keeps changing while it runs.
``idle`` sets up and halts: its memory never changes.  ``fill`` is ``ab``
halting after its first pass: every page written once, then nothing.  On the emulated
platform also ``regs`` (a checkpoint chain that breaks if a register is
lost) and ``dirty:RATE`` (dirties RATE bytes of new pages per second).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from vmmig.errors import ConfigError, PlatformError
from vmmig.guests.ab_check import ab_passes, ab_region, check_ab_heads
from vmmig.guests.emu import dirty_counts
from vmmig.guests.emu.regs_check import check_regs_chain, regs_checkpoints
from vmmig.integrity import RamScan


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = [
    "GUEST_WORKLOADS",
    "check_workload",
    "guest_halts",
    "guest_image_name",
    "wait_guest_progress",
    "wait_workload_ready",
]

#: Workloads a boot-sector guest can run, by name.
GUEST_WORKLOADS: Final = ("ab", "fill", "idle")
#: Workloads run by the a-b guest, whose memory obeys the a-b edge rule.
_AB_FAMILY: Final = frozenset({"ab", "fill"})
#: Workloads whose guest halts: a resumed one shows it runs by its state alone.
_HALTING: Final = frozenset({"fill", "idle"})

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


def guest_halts(workload: str) -> bool:
    """Whether the workload's guest halts once done (a resumed one shows it runs by its state)."""
    return workload in _HALTING


def check_workload(workload: str, scan: RamScan, memory: Buffer | None = None
                   ) -> tuple[str, str, bool]:
    """Check the workload's own invariant on a stopped guest's memory.

    :param scan: the target's scanned RAM.
    :param memory: the target's whole RAM, which ``regs`` needs.
    :return: (check name, one-line detail, ok).
    """
    if workload in _AB_FAMILY:
        region = ab_region(scan.first_page, scan.size)
        result = check_ab_heads(scan.page_heads, region)
        return "a-b", result.detail, result.ok
    if workload == "regs" and memory is not None:
        regs = check_regs_chain(memory)
        return "register-chain", regs.detail, regs.ok
    return "workload", f"{workload}: no invariant to check", True


def _fingerprint(workload: str, memory: Buffer) -> object:
    """Something of the guest's memory that changes while the workload runs."""
    if workload == "ab":
        start, end = ab_region(memory)
        return bytes(memoryview(memory).cast("B")[start:end:4096])
    if workload == "regs":
        return regs_checkpoints(memory)
    return dirty_counts(memory)


async def wait_guest_progress(workload: str, memory: Buffer,
                              status: Callable[[], Awaitable[str]]) -> tuple[bool, str]:
    """Wait until a resumed guest shows it runs.

    Every workload must be ``running``; those that do not halt must change their memory.

    :return: (ok, one-line detail).
    """
    if (state := await status()) != "running":
        return False, f"guest is {state!r}, not running"
    if guest_halts(workload):
        return True, "guest running"
    before = _fingerprint(workload, memory)
    deadline = time.monotonic() + PROGRESS_TIMEOUT
    while time.monotonic() < deadline:
        await asyncio.sleep(_POLL)
        if _fingerprint(workload, memory) != before:
            return True, "guest running, memory changing"
    return False, f"guest memory unchanged for {PROGRESS_TIMEOUT:.0f} s after resume"


async def wait_workload_ready(workload: str, memory: Buffer) -> None:
    """Wait until a booted guest's memory obeys its workload's rule.

    ``ab`` zeroes its pages first, so its rule holds only once it has
    completed a pass; migrating earlier would compare firmware leftovers.
    ``regs`` must have written its first checkpoint.

    :raises PlatformError: when the guest does not get there in time.
    """
    ready: Callable[[], bool]
    if workload in _AB_FAMILY:
        ready = lambda: ab_passes(memory) >= 1  # noqa: E731
    elif workload == "regs":
        ready = lambda: regs_checkpoints(memory) >= 1  # noqa: E731
    else:
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        if time.monotonic() > deadline:
            raise PlatformError(f"the {workload} guest did not get going within "
                                f"{READY_TIMEOUT:.0f} s")
        await asyncio.sleep(_POLL)
