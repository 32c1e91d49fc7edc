"""Whether an emulated guest runs, as its hypervisor can tell without reading its memory.

An encrypted guest's memory is ciphertext to the host, but the host still
sees which pages it writes (the dirty log) and what it prints on its
serial port.  A guest that runs and does not halt writes its memory; one
that halts shows it ran by its state alone.  The ``ab`` guest checks the
a-b rule itself on every page it increments and prints a mark per pass
(``B``), or ``X`` before it halts on a page out of step: two marks after a
resume mean a whole pass found memory as it should be.
"""

from __future__ import annotations

import asyncio
import time

from vmmig.platforms.emu.machine_process import EmuMachine
from vmmig.workloads import PROGRESS_TIMEOUT, guest_halts


__all__ = ["wait_ab_passes", "wait_guest_writes"]

#: How often the dirty log is read.
_POLL = 0.05


async def wait_guest_writes(machine: EmuMachine, workload: str,
                            timeout: float = PROGRESS_TIMEOUT) -> tuple[bool, str]:
    """Wait until the guest writes its memory; (ok, one-line detail).

    Uses the machine's dirty log, so nothing else may be logging it.
    """
    if (state := await machine.status()) != "running":
        return False, f"guest is {state!r}, not running"
    if guest_halts(workload):
        return True, "guest running"
    await machine.execute("x-dirty-log-start")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL)
            if dirty := (await machine.execute("x-dirty-log-sync"))["dirty"]:
                return True, f"guest running, writing its memory ({dirty} pages dirtied)"
    finally:
        await machine.execute("x-dirty-log-stop")
    return False, f"guest wrote nothing for {timeout:.0f} s"


async def wait_ab_passes(machine: EmuMachine, passes: int = 2,
                         timeout: float = PROGRESS_TIMEOUT) -> tuple[bool, str]:
    """Wait for ``passes`` more pass marks of the ab guest's own a-b check; (ok, detail)."""
    before = (await machine.execute("x-query-console"))["counts"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = (await machine.execute("x-query-console"))["counts"]
        if counts.get("X", 0) > before.get("X", 0):
            return False, "the guest's own check found a page out of step and halted"
        if counts.get("B", 0) >= before.get("B", 0) + passes:
            return True, (f"the guest's own check passed on every page, {passes} passes after "
                          "resume")
        await asyncio.sleep(_POLL)
    return False, f"the guest completed no {passes} passes in {timeout:.0f} s after resume"
