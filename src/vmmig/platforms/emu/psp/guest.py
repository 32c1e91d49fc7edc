"""Guest contexts: the per-guest state the PSP keeps, and the machine's interfaces.

The guest state machine (SEV API 55766 chapter 6.1, GSTATE)::

    LAUNCH_START --> LUPDATE --LAUNCH_MEASURE--> LSECRET --LAUNCH_FINISH--> RUNNING
    RECEIVE_START -> RUPDATE --RECEIVE_FINISH--------------------------> RUNNING
    RUNNING --SEND_START--> SUPDATE --SEND_FINISH--> SENT
                               '-----SEND_CANCEL---> RUNNING

:data:`ALLOWED_STATES` says which commands each state accepts; any other
command fails with INVALID_GUEST_STATE and changes nothing.  SENT (state 6 in
recent revisions of the spec) is final: the guest's image now belongs to the
target, so the source must never run it again (no fork); only GUEST_STATUS
and DECOMMISSION are accepted.  :attr:`GuestState.runnable` tells the machine
whether its vCPUs may run.

The PSP touches guest memory only through the small protocols below, which
the machine implements: it never learns the memory layout, and private
plaintext goes straight from the PSP to the machine's memory (which keeps it
encrypted under the VEK loaded by ACTIVATE, see :class:`MemoryKeySlot`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol

import attrs

from vmmig.platforms.emu.psp.policy import Policy
from vmmig.platforms.emu.psp.session import TransportKeys
from vmmig.platforms.emu.psp.status import SevCommand


__all__ = [
    "ALLOWED_STATES",
    "GuestContext",
    "GuestMemoryReader",
    "GuestMemoryWriter",
    "GuestState",
    "MemoryKeySlot",
    "RunningHash",
    "VmsaReader",
    "VmsaWriter",
]


class GuestState(enum.IntEnum):
    """GSTATE values of the SEV API."""

    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6

    @property
    def runnable(self) -> bool:
        """Whether the guest may execute: launched, or still running while being sent."""
        return self in (GuestState.RUNNING, GuestState.SUPDATE)


_LIVE: Final = frozenset(GuestState) - {GuestState.UNINIT, GuestState.SENT}

#: The guest states in which each guest command is accepted.
ALLOWED_STATES: Final[Mapping[SevCommand, frozenset[GuestState]]] = MappingProxyType(
    {
        SevCommand.LAUNCH_UPDATE_DATA: frozenset({GuestState.LUPDATE}),
        SevCommand.LAUNCH_UPDATE_VMSA: frozenset({GuestState.LUPDATE}),
        SevCommand.LAUNCH_MEASURE: frozenset({GuestState.LUPDATE}),
        SevCommand.LAUNCH_SECRET: frozenset({GuestState.LSECRET}),
        SevCommand.LAUNCH_FINISH: frozenset({GuestState.LSECRET}),
        SevCommand.ACTIVATE: _LIVE,
        SevCommand.SEND_START: frozenset({GuestState.RUNNING}),
        SevCommand.SEND_UPDATE_DATA: frozenset({GuestState.SUPDATE}),
        SevCommand.SEND_UPDATE_VMSA: frozenset({GuestState.SUPDATE}),
        SevCommand.SEND_FINISH: frozenset({GuestState.SUPDATE}),
        SevCommand.SEND_CANCEL: frozenset({GuestState.SUPDATE}),
        SevCommand.RECEIVE_UPDATE_DATA: frozenset({GuestState.RUPDATE}),
        SevCommand.RECEIVE_UPDATE_VMSA: frozenset({GuestState.RUPDATE}),
        SevCommand.RECEIVE_FINISH: frozenset({GuestState.RUPDATE}),
        SevCommand.GUEST_STATUS: frozenset(GuestState),
        SevCommand.DECOMMISSION: frozenset(GuestState),
    }
)


class GuestMemoryWriter(Protocol):
    """Where LAUNCH_UPDATE_DATA, LAUNCH_SECRET and RECEIVE_UPDATE_DATA put plaintext."""

    def write_private(self, gpa: int, plaintext: bytes) -> None:
        """Store ``plaintext`` as private (encrypted) guest memory at ``gpa``."""


class GuestMemoryReader(Protocol):
    """Where SEND_UPDATE_DATA reads a private range's plaintext."""

    def read_private(self, gpa: int, n: int) -> bytes:
        """The plaintext of ``n`` bytes of private guest memory at ``gpa``."""


class VmsaWriter(Protocol):
    """Where LAUNCH_UPDATE_VMSA and RECEIVE_UPDATE_VMSA put a vCPU's save area."""

    def write_vmsa(self, vcpu_index: int, plaintext: bytes) -> None:
        """Store the VMSA of vCPU ``vcpu_index`` encrypted, out of the host's reach."""


class VmsaReader(Protocol):
    """Where SEND_UPDATE_VMSA reads a vCPU's save area."""

    def read_vmsa(self, vcpu_index: int) -> bytes:
        """The plaintext VMSA of vCPU ``vcpu_index``."""


class MemoryKeySlot(Protocol):
    """The memory controller's key slot of one guest (its ASID), loaded by ACTIVATE."""

    def load_key(self, vek: bytes) -> None:
        """Use ``vek`` (32 bytes, AES-XEX) for this guest's private pages from now on."""


class RunningHash(Protocol):
    """The part of :mod:`hashlib`'s hash objects the launch digest uses."""

    def update(self, data: bytes, /) -> None:
        """Add ``data``."""

    def copy(self) -> RunningHash:
        """An independent copy."""

    def digest(self) -> bytes:
        """The digest so far."""


@attrs.define(eq=False)
class GuestContext:
    """One guest's firmware-side state; lives only inside the PSP object."""

    handle: int
    policy: Policy
    state: GuestState
    #: The memory encryption key: leaves the PSP only into a :class:`MemoryKeySlot`.
    vek: bytes = attrs.field(repr=False)
    #: TEK/TIK of the owner's launch session or of the incoming migration.
    keys: TransportKeys = attrs.field(repr=False)
    #: SHA-256 over the measured launch data (LUPDATE only).
    digest: RunningHash = attrs.field(repr=False)
    #: MEASURE, set by LAUNCH_MEASURE; LAUNCH_SECRET's MAC binds it.
    measure: bytes | None = attrs.field(default=None, repr=False)
    #: vCPU indices whose VMSA was measured at launch or received.
    vcpus: frozenset[int] = frozenset()
    #: TEK/TIK of the outgoing migration (SUPDATE only).
    send_keys: TransportKeys | None = attrs.field(default=None, repr=False)
