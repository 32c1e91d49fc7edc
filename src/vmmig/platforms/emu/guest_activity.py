"""Whether an emulated guest runs, as its hypervisor can tell without reading its memory.

An encrypted guest's memory is ciphertext to the host, but the host still
sees which pages it writes (the dirty log) and what it prints on its
serial port.  A guest that runs and does not halt writes its memory; one
that halts shows it ran by its state alone.  The ``ab`` guest checks the
a-b rule itself on every page it increments and prints a mark per pass
(``B``), or ``X`` before it halts on a page out of step: two marks after a
resume mean a whole pass found memory as it should be.  A migrated ``regs``
guest checks its register chain across the migration and prints ``V`` or
``X`` (:mod:`.guest_checks`).
"""

from __future__ import annotations

import asyncio
import time

from vmmig.platforms.emu.guest_checks import CHAIN_BROKEN, CHAIN_INTACT
from vmmig.platforms.emu.machine_process import EmuMachine
from vmmig.workloads import PROGRESS_TIMEOUT, guest_halts


__all__ = ["console_marks", "resume_and_watch", "wait_ab_passes", "wait_guest_writes",
           "wait_regs_verdict"]

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


async def console_marks(machine: EmuMachine) -> dict[str, int]:
    """What the guest has printed so far (a baseline to take before resuming it)."""
    counts: dict[str, int] = (await machine.execute("x-query-console"))["counts"]
    return counts


async def wait_ab_passes(machine: EmuMachine, before: dict[str, int], passes: int = 2,
                         timeout: float = PROGRESS_TIMEOUT) -> tuple[bool, str]:
    """Wait for ``passes`` more pass marks of the ab guest's own a-b check than ``before``
    (:func:`console_marks` before the resume); (ok, detail)."""
    return await _wait_marks(
        machine, before, "B", passes, timeout,
        ok=f"the guest's own check passed on every page, {passes} passes after resume",
        broken="the guest's own check found a page out of step and halted",
        late=f"the guest completed no {passes} passes in {timeout:.0f} s after resume")


async def wait_regs_verdict(machine: EmuMachine, before: dict[str, int],
                            timeout: float = PROGRESS_TIMEOUT) -> tuple[bool, str]:
    """Wait for a migrated regs guest's own verdict on its register chain, printed since
    ``before`` (:func:`console_marks` before the resume); (ok, detail)."""
    return await _wait_marks(
        machine, before, CHAIN_INTACT, 1, timeout,
        ok="the guest's own check: the register chain runs on unbroken across the migration",
        broken="the guest's own check: the register chain broke across the migration",
        late=f"the guest gave no verdict on its register chain in {timeout:.0f} s")


async def _wait_marks(machine: EmuMachine, before: dict[str, int], good: str, count: int,
                      timeout: float, *, ok: str, broken: str, late: str) -> tuple[bool, str]:
    """Wait until the console shows ``count`` more ``good`` marks (ok) or one more ``X``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = await console_marks(machine)
        if counts.get(CHAIN_BROKEN, 0) > before.get(CHAIN_BROKEN, 0):
            return False, broken
        if counts.get(good, 0) >= before.get(good, 0) + count:
            return True, ok
        await asyncio.sleep(_POLL)
    return False, late


async def resume_and_watch(machine: EmuMachine, workload: str, *, chain_verdict: bool
                           ) -> list[tuple[str, str, bool]]:
    """Resume a migrated encrypted guest and watch what its host can: its writes, and
    the guest's own checks on the console (ab's passes; with ``chain_verdict``, a regs
    guest's verdict, which only an MH target's guest gives).

    :returns: the checks as (name, detail, ok), stopping at the first that fails.
    """
    printed = await console_marks(machine)
    await machine.cont()
    ok, detail = await wait_guest_writes(machine, workload)
    checks = [("guest-running", detail, ok)]
    if ok and workload == "ab":
        ok, detail = await wait_ab_passes(machine, printed)
        checks.append(("a-b", detail, ok))
    elif ok and workload == "regs" and chain_verdict:
        ok, detail = await wait_regs_verdict(machine, printed)
        checks.append(("register-chain", detail, ok))
    return checks
