"""The regs guest's own check of its register chain after a migration (guest-side code).

On a target whose memory and registers are the guest's alone (SEV-ES: the
host can read neither), only the guest can tell whether its registers came
through intact.  Like the Migration Handler, this runs as Python inside the
guest's trust domain: when a migrated ``regs`` guest first runs on its
target, it waits for a few more checkpoints and checks the chain from the
last one written before the migration (:func:`check_regs_chain`; every link
recomputes the recurrence, so a register lost or altered breaks it), then
prints its verdict on COM1: ``V`` for a chain intact across the migration,
``X`` for a broken one.  The host learns the verdict only (x-query-console).

Only checkpoints the guest has finished are read (the counter moves after
an entry is written), and the ring holds seconds' worth, so the running
guest never overwrites what is being checked.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Final

from vmmig.errors import IntegrityError
from vmmig.guests.emu.regs_check import check_regs_chain, regs_checkpoints
from vmmig.platforms.emu.console import COM1, SerialConsole


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = ["CHAIN_BROKEN", "CHAIN_INTACT", "watch_regs_chain"]

_log = logging.getLogger(__name__)

#: The verdicts on COM1.
CHAIN_INTACT: Final = "V"
CHAIN_BROKEN: Final = "X"
#: Checkpoints to wait for after the resume before checking.
_MORE: Final = 3
#: How long the guest gets to write them.
_TIMEOUT: Final = 30.0
_POLL: Final = 0.01


def watch_regs_chain(ram: Buffer, console: SerialConsole) -> threading.Thread:
    """Start checking the chain across the migration the guest is about to resume from.

    :param ram: the guest's RAM as the guest sees it (plaintext).
    """
    before = regs_checkpoints(ram)
    thread = threading.Thread(target=_check, args=(ram, console, before),
                              name="regs-chain-check", daemon=True)
    thread.start()
    return thread


def _check(ram: Buffer, console: SerialConsole, before: int) -> None:
    deadline = time.monotonic() + _TIMEOUT
    try:
        while regs_checkpoints(ram) < before + _MORE:
            if time.monotonic() > deadline:
                _log.warning("regs guest wrote no %d checkpoints in %.0f s", _MORE, _TIMEOUT)
                console.write(COM1, 1, ord(CHAIN_BROKEN))
                return
            time.sleep(_POLL)
        verdict = check_regs_chain(ram, since=max(before - 1, 0))
    except (IntegrityError, ValueError) as err:  # no ring (not regs), or RAM gone
        _log.warning("regs chain check failed: %s", err)
        console.write(COM1, 1, ord(CHAIN_BROKEN))
        return
    _log.info("regs chain across the migration: %s", verdict.detail)
    console.write(COM1, 1, ord(CHAIN_INTACT if verdict.ok else CHAIN_BROKEN))
