"""The MH's session state machine: states, events and the table of legal transitions.

Rule (after h11): what may follow what lives here, as data; the handler
asks :func:`next_state` before it does any work, and a command that has no
row in the table for the current state is BAD_STATE with nothing changed.

Source::

    idle -> source-nonce -> source-open --export (pages, CPU state)--> source-open
                 (or idle -> source-open when the target's nonce came first)
    source-open --manifest--> source-sealed --commit (receipt)--> source-retired
    source-open --abort--> idle;  source-sealed --abort (token)--> idle

Target::

    idle -> target-nonce -> target-open --import (pages, CPU state)--> target-open
    target-open --manifest ok--> target-verified --commit--> target-committed
    target-* --integrity failure--> failed --abort--> idle

Why these states:

- ``source-sealed``: once the manifest is out the target can commit, so
  the source may resume only on the target's abort token (anti-fork);
  exports stop, as the digest covered memory as of the stop.
- ``failed``: any authentication, replay, order or manifest failure poisons
  the target's session: the stream is known hostile and this session can
  never commit; only ABORT (and a new session with new nonces) goes on.
- ``target-committed`` and ``source-retired`` are final: no abort after
  the commit point.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from vmmig.firmware.abi import Role


__all__ = ["SESSION_STATES", "TRANSITIONS", "MhEvent", "MhState", "next_state", "role_of"]


class MhState(enum.IntEnum):
    """Where the MH stands; the value is HELLO's ``state`` word."""

    #: No session.
    IDLE = 0
    #: Source: own nonce issued, waiting for the target's.
    SOURCE_NONCE = 1
    #: Source: keys derived; exporting.
    SOURCE_OPEN = 2
    #: Source: manifest sealed; waiting for a receipt or an abort token.
    SOURCE_SEALED = 3
    #: Source: the target committed; this copy must never run again.
    SOURCE_RETIRED = 4
    #: Target: own nonce issued, waiting for the source's.
    TARGET_NONCE = 5
    #: Target: keys derived; importing.
    TARGET_OPEN = 6
    #: Target: manifest verified; may commit.
    TARGET_VERIFIED = 7
    #: Target: committed; the guest runs here.
    TARGET_COMMITTED = 8
    #: Target: the stream failed a check; only ABORT is accepted.
    FAILED = 9


class MhEvent(enum.Enum):
    """What a command does, once its payload is understood."""

    ISSUE_NONCE = "issue-nonce"
    OPEN = "open"
    EXPORT = "export"
    IMPORT = "import"
    SEAL_MANIFEST = "seal-manifest"
    VERIFY_MANIFEST = "verify-manifest"
    COMMIT = "commit"
    ABORT = "abort"
    INTEGRITY_FAILURE = "integrity-failure"


def _table() -> Mapping[tuple[MhState, Role, MhEvent], MhState]:
    s, t, e = MhState, Role, MhEvent
    rows = {
        (s.IDLE, t.SOURCE, e.ISSUE_NONCE): s.SOURCE_NONCE,
        (s.IDLE, t.SOURCE, e.OPEN): s.SOURCE_OPEN,
        (s.SOURCE_NONCE, t.SOURCE, e.ISSUE_NONCE): s.SOURCE_NONCE,
        (s.SOURCE_NONCE, t.SOURCE, e.OPEN): s.SOURCE_OPEN,
        (s.SOURCE_NONCE, t.SOURCE, e.ABORT): s.IDLE,
        (s.SOURCE_OPEN, t.SOURCE, e.EXPORT): s.SOURCE_OPEN,
        (s.SOURCE_OPEN, t.SOURCE, e.SEAL_MANIFEST): s.SOURCE_SEALED,
        (s.SOURCE_OPEN, t.SOURCE, e.ABORT): s.IDLE,
        (s.SOURCE_SEALED, t.SOURCE, e.COMMIT): s.SOURCE_RETIRED,
        (s.SOURCE_SEALED, t.SOURCE, e.ABORT): s.IDLE,
        (s.IDLE, t.TARGET, e.ISSUE_NONCE): s.TARGET_NONCE,
        (s.IDLE, t.TARGET, e.OPEN): s.TARGET_OPEN,
        (s.TARGET_NONCE, t.TARGET, e.ISSUE_NONCE): s.TARGET_NONCE,
        (s.TARGET_NONCE, t.TARGET, e.OPEN): s.TARGET_OPEN,
        (s.TARGET_NONCE, t.TARGET, e.ABORT): s.IDLE,
        (s.TARGET_OPEN, t.TARGET, e.IMPORT): s.TARGET_OPEN,
        (s.TARGET_OPEN, t.TARGET, e.VERIFY_MANIFEST): s.TARGET_VERIFIED,
        (s.TARGET_OPEN, t.TARGET, e.INTEGRITY_FAILURE): s.FAILED,
        (s.TARGET_OPEN, t.TARGET, e.ABORT): s.IDLE,
        (s.TARGET_VERIFIED, t.TARGET, e.COMMIT): s.TARGET_COMMITTED,
        (s.TARGET_VERIFIED, t.TARGET, e.ABORT): s.IDLE,
        (s.FAILED, t.TARGET, e.ABORT): s.IDLE,
        # Idle abort is harmless and lets a host reset without knowing the state.
        (s.IDLE, t.NONE, e.ABORT): s.IDLE,
    }
    return MappingProxyType(rows)


#: ``(state, role, event) -> next state``: every legal transition.
TRANSITIONS: Final = _table()

#: States that hold session keys (export, import, manifest and commit need one).
SESSION_STATES: Final = frozenset(
    {
        MhState.SOURCE_OPEN,
        MhState.SOURCE_SEALED,
        MhState.TARGET_OPEN,
        MhState.TARGET_VERIFIED,
        MhState.FAILED,
    }
)


def role_of(state: MhState) -> Role:
    """The role a state belongs to (``NONE`` for idle)."""
    if state is MhState.IDLE:
        return Role.NONE
    if state.name.startswith("SOURCE"):
        return Role.SOURCE
    return Role.TARGET


def next_state(state: MhState, event: MhEvent, role: Role | None = None) -> MhState | None:
    """The state ``event`` leads to from ``state``, or None if illegal.

    ``role`` is needed only where the state does not imply it (idle).
    """
    return TRANSITIONS.get((state, role_of(state) if role is None else role, event))
