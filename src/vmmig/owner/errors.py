"""Why the guest owner says no: :class:`AttestationError` and its reasons.

::

    VmmigError
     +-- AttestationError        the owner refused; no session or secret left it
                                 (.reason: a Refusal, .guest)

Every refusal names one :class:`Refusal`, so that a caller (and the audit
log, and a remote client) can tell a host that lies from one that is merely
misconfigured without parsing messages.
"""

from __future__ import annotations

import enum

from vmmig.errors import VmmigError


__all__ = ["AttestationError", "Refusal"]


class Refusal(enum.Enum):
    """The reasons the owner refuses a launch or a secret; values are wire names."""

    #: A link of the platform's certificate chain does not verify (tampered or malformed).
    BAD_CHAIN = "bad-chain"
    #: The platform's chain leads to another AMD root, or names another platform than the session's.
    UNKNOWN_PLATFORM = "unknown-platform"
    #: The guest is not one the owner expects (no expected launch recorded).
    UNKNOWN_GUEST = "unknown-guest"
    #: The launch measurement is not the one a genuine PSP reports for the expected launch.
    MEASUREMENT_MISMATCH = "measurement-mismatch"
    #: The guest's policy, or the platform's firmware, is one the owner forbids.
    POLICY_REFUSED = "policy-refused"
    #: No such launch session (never made, made for another guest, or forgotten).
    UNKNOWN_SESSION = "unknown-session"
    #: The launch session already had its one measurement presented.
    REPLAYED_SESSION = "replayed-session"


class AttestationError(VmmigError):
    """The guest owner refused; nothing secret left it.

    :param reason: why, as a :class:`Refusal`.
    :param guest: the guest the request was about.
    :param detail: one line for the human reader.
    """

    def __init__(self, reason: Refusal, guest: str, detail: str) -> None:
        super().__init__(f"guest owner refused {guest!r}: {reason.value}: {detail}")
        self.reason = reason
        self.guest = guest
        self.detail = detail
