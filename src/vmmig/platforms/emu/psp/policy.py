"""The SEV guest policy (a 32-bit word) and the firmware version it constrains.

Bit layout (SEV API 55766 chapter 3; virtee/sev ``src/launch/sev.rs``)::

    bit  0     NODBG   debug commands (DBG_DECRYPT/DBG_ENCRYPT) are refused
    bit  1     NOKS    the guest shares its VEK with no other guest
    bit  2     ES      the guest is an SEV-ES guest (encrypted VMSAs)
    bit  3     NOSEND  SEND_START is refused: the guest never leaves this PSP
    bit  4     DOMAIN  SEND only to a platform with the same OCA
    bit  5     SEV     SEND only to an SEV-capable platform
    bits 6-15  reserved, must be zero
    bits 16-23 API_MAJOR  minimum firmware API major version
    bits 24-31 API_MINOR  minimum firmware API minor version

On the wire (LAUNCH_START, the policy MAC, the measurement) the word is
little-endian.

What the emulated PSP enforces (the ``require_*`` functions):

- NODBG: nothing to refuse, because the DBG_DECRYPT/DBG_ENCRYPT commands are
  not emulated at all (the host never gets a debug view of private memory).
- NOKS: LAUNCH_START with a nonzero ``share_handle`` (the new guest takes an
  existing guest's VEK, the spec's key sharing, e.g. for a mirror VM) is
  refused if either guest's policy has NOKS.
- ES: VMSA commands are refused without it; an ES guest cannot be measured
  (LAUNCH_MEASURE) without a measured VMSA, nor finish receiving without one.
- NOSEND: SEND_START is refused.
- DOMAIN: SEND_START is refused unless the target's OCA is this platform's.
- SEV: always satisfied (every target is an SEV platform).
- API_MAJOR/MINOR: LAUNCH_START and RECEIVE_START are refused by firmware
  older than the minimum; SEND_START refuses a target whose PEK states an
  older API version.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from vmmig.platforms.emu.psp.status import PspError, PspStatus


__all__ = [
    "FirmwareVersion",
    "Policy",
    "require_es",
    "require_firmware",
    "require_key_sharing",
    "require_sendable",
]

_RESERVED_MASK: Final = 0x0000_FFC0


def _u8(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{attribute.name} must fit in one byte, got {value}")


@attrs.frozen(order=True)
class FirmwareVersion:
    """A PSP firmware version: API major.minor and build (PLATFORM_STATUS).

    Ordered by (major, minor, build); policies compare major.minor only.
    """

    api_major: int = attrs.field(validator=_u8)
    api_minor: int = attrs.field(validator=_u8)
    build: int = attrs.field(default=0, validator=_u8)

    def __str__(self) -> str:
        return f"{self.api_major}.{self.api_minor} build {self.build}"


@attrs.frozen
class Policy:
    """A guest policy; :meth:`value` and :meth:`from_value` convert the 32-bit word."""

    nodbg: bool = False
    noks: bool = False
    es: bool = False
    nosend: bool = False
    domain: bool = False
    sev: bool = False
    api_major: int = attrs.field(default=0, validator=_u8)
    api_minor: int = attrs.field(default=0, validator=_u8)

    @property
    def value(self) -> int:
        """The policy as the 32-bit word of the spec."""
        flags = (self.nodbg, self.noks, self.es, self.nosend, self.domain, self.sev)
        word = sum(1 << bit for bit, on in enumerate(flags) if on)
        return word | self.api_major << 16 | self.api_minor << 24

    def to_bytes(self) -> bytes:
        """The little-endian word, as MACed and measured."""
        return struct.pack("<I", self.value)

    @classmethod
    def from_value(cls, word: int) -> Policy:
        """Decode a 32-bit policy word.

        :raises ValueError: if it does not fit 32 bits or sets reserved bits 6-15.
        """
        if not 0 <= word <= 0xFFFF_FFFF:
            raise ValueError(f"policy {word:#x} does not fit 32 bits")
        if word & _RESERVED_MASK:
            raise ValueError(f"policy {word:#010x} sets reserved bits 6-15")
        nodbg, noks, es, nosend, domain, sev = (bool(word >> bit & 1) for bit in range(6))
        return cls(
            nodbg,
            noks,
            es,
            nosend,
            domain,
            sev,
            api_major=word >> 16 & 0xFF,
            api_minor=word >> 24 & 0xFF,
        )

    def allows_firmware(self, api_major: int, api_minor: int) -> bool:
        """Whether firmware of API ``api_major.api_minor`` meets the minimum version."""
        return (api_major, api_minor) >= (self.api_major, self.api_minor)


def require_firmware(policy: Policy, api_major: int, api_minor: int, whose: str) -> None:
    """Refuse a platform older than the policy's minimum API version.

    :raises PspError: POLICY_FAILURE.
    """
    if not policy.allows_firmware(api_major, api_minor):
        raise PspError(
            PspStatus.POLICY_FAILURE,
            f"policy requires API {policy.api_major}.{policy.api_minor}, "
            f"{whose} firmware is {api_major}.{api_minor}",
        )


def require_es(policy: Policy) -> None:
    """Refuse a VMSA command for a guest whose policy is not SEV-ES.

    :raises PspError: POLICY_FAILURE.
    """
    if not policy.es:
        raise PspError(PspStatus.POLICY_FAILURE, "VMSA commands need policy ES (SEV-ES)")


def require_sendable(policy: Policy) -> None:
    """Refuse SEND_START under NOSEND.

    :raises PspError: POLICY_FAILURE.
    """
    if policy.nosend:
        raise PspError(PspStatus.POLICY_FAILURE, "policy NOSEND forbids migrating this guest")


def require_key_sharing(new: Policy, existing: Policy) -> None:
    """Refuse to share a VEK between two guests when either forbids it (NOKS).

    :raises PspError: POLICY_FAILURE.
    """
    if new.noks or existing.noks:
        raise PspError(PspStatus.POLICY_FAILURE, "policy NOKS forbids sharing the VEK")
