"""SEV-ES CPU state: the guest's vCPUs as the MH sees them, and their record body.

With SEV-ES the hypervisor can neither read nor set a vCPU's registers: they
live in the vCPU's VMSA page, encrypted under the guest's key.  The MH, inside
the guest's trust domain, reads each stopped vCPU's state on the source and
seals it into the data stream; the target stages the states and hands them to
its vCPUs only at COMMIT, once the manifest (which counts and digests them)
verified: no vCPU ever runs on state from a stream that may still fail.

A CPU-state record is an envelope of kind CPU_STATE sealed by the data
stream (:mod:`vmmig.firmware.records`: same key, same sequence counter as the
page records), without entries; its body is 4104 bytes::

    0   u32   vCPU index
    4   u32   reserved, zero
    8   4096  the vCPU's state (its VMSA page, plaintext)

The index is inside the ciphertext: a host that relabels a record fails its tag.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final, Protocol

from vmmig.firmware.abi import PAGE_SIZE, Refusal, Status
from vmmig.firmware.manifest import MismatchBits


__all__ = ["CPU_BODY_SIZE", "CPU_STATE_SIZE", "GuestCpus", "pack_cpu_body", "unpack_cpu_body"]

_HEAD = struct.Struct("<II")  # vCPU index, reserved
#: Bytes of one vCPU's state (a VMSA page).
CPU_STATE_SIZE: Final = PAGE_SIZE
#: Plaintext bytes of a CPU-state record's body.
CPU_BODY_SIZE: Final = _HEAD.size + CPU_STATE_SIZE


class GuestCpus(Protocol):
    """The guest's vCPUs, as the platform running an SEV-ES guest's MH provides them.

    The MH trusts these (they are the guest's own, like its RAM).
    """

    @property
    def count(self) -> int:
        """How many vCPUs the guest has (indices ``0 .. count - 1``)."""
        ...

    def save(self, index: int) -> bytes:
        """Source: the state of vCPU ``index``, ``CPU_STATE_SIZE`` bytes.

        The vCPU is stopped and must stay so: its state is now in the stream.
        """
        ...

    def restore(self, states: Mapping[int, bytes]) -> None:
        """Target: give every vCPU its state (``index -> state``, all of them).

        Called once, at COMMIT, after the manifest verified; never on ABORT.
        """
        ...


def pack_cpu_body(index: int, state: bytes) -> bytes:
    """The plaintext body of vCPU ``index``'s record."""
    if len(state) != CPU_STATE_SIZE:
        # The platform's GuestCpus is broken; never seal a body the target must refuse.
        raise ValueError(f"vCPU {index}'s state is {len(state)} bytes, not {CPU_STATE_SIZE}")
    return _HEAD.pack(index, 0) + state


def unpack_cpu_body(body: bytes, count: int) -> tuple[int, bytes]:
    """``(index, state)`` of an authenticated body, for a guest of ``count`` vCPUs.

    Refusal(MISMATCH, detail CPU_STATE) if the genuine source sealed a state
    this guest cannot take (an index it lacks, a reserved word set): the
    session can never commit, so the refusal poisons it.
    """
    index, reserved = _HEAD.unpack_from(body)
    if reserved or index >= count:
        raise Refusal(Status.MISMATCH, f"CPU state for vCPU {index} of a {count}-vCPU guest",
                      int(MismatchBits.CPU_STATE))
    return int(index), body[_HEAD.size:]
