"""Typed command buffers: one request class per command that takes more than a handle.

Field names follow the SEV API command buffers (55766 chapter 6; QEMU and KVM
use the same names: ``dh_cert``, ``session``, ``hdr``...).  Byte fields carry
the spec formats documented in :mod:`.sev_cert`, :mod:`.session`, :mod:`.packets`
and :mod:`.chain`.  Commands whose only input is the guest handle take it as a
plain ``int``.
"""

from __future__ import annotations

import attrs

from vmmig.platforms.emu.psp.guest import GuestState
from vmmig.platforms.emu.psp.policy import FirmwareVersion, Policy


__all__ = [
    "GuestStatus",
    "LaunchSecretRequest",
    "LaunchStartRequest",
    "LaunchUpdateDataRequest",
    "LaunchUpdateVmsaRequest",
    "PdhCertExport",
    "PlatformStatus",
    "ReceiveStartRequest",
    "ReceiveUpdateDataRequest",
    "ReceiveUpdateVmsaRequest",
    "SendStartRequest",
    "SendStartResponse",
    "SendUpdateDataRequest",
    "SendUpdateVmsaRequest",
    "TransportPacket",
]


@attrs.frozen
class LaunchStartRequest:
    """LAUNCH_START: begin launching a guest under the owner's session.

    :param share_handle: 0 for a fresh VEK; otherwise share the VEK of that
        guest (key sharing, refused if either policy has NOKS).
    """

    policy: Policy
    dh_cert: bytes = attrs.field(repr=False)
    session: bytes = attrs.field(repr=False)
    share_handle: int = 0


@attrs.frozen
class LaunchUpdateDataRequest:
    """LAUNCH_UPDATE_DATA: measure ``data`` and place it at ``gpa`` (both 16-byte aligned)."""

    handle: int
    gpa: int
    data: bytes = attrs.field(repr=False)


@attrs.frozen
class LaunchUpdateVmsaRequest:
    """LAUNCH_UPDATE_VMSA (SEV-ES): measure and seal one vCPU's 4 KiB VMSA."""

    handle: int
    vcpu_index: int
    vmsa: bytes = attrs.field(repr=False)


@attrs.frozen
class LaunchSecretRequest:
    """LAUNCH_SECRET: authenticate, decrypt and place the owner's secret at ``gpa``."""

    handle: int
    header: bytes = attrs.field(repr=False)
    ciphertext: bytes = attrs.field(repr=False)
    gpa: int


@attrs.frozen
class SendStartRequest:
    """SEND_START: the target's PDH and chain (PLAT_CERT = PEK||OCA||CEK, AMD_CERT = ASK||ARK)."""

    handle: int
    pdh_cert: bytes = attrs.field(repr=False)
    plat_certs: bytes = attrs.field(repr=False)
    amd_certs: bytes = attrs.field(repr=False)


@attrs.frozen
class SendStartResponse:
    """SEND_START's outputs: what the target's RECEIVE_START needs."""

    policy: Policy
    dh_cert: bytes = attrs.field(repr=False)
    session: bytes = attrs.field(repr=False)


@attrs.frozen
class SendUpdateDataRequest:
    """SEND_UPDATE_DATA: export ``length`` bytes of private memory at ``gpa``."""

    handle: int
    gpa: int
    length: int


@attrs.frozen
class SendUpdateVmsaRequest:
    """SEND_UPDATE_VMSA (SEV-ES): export one vCPU's VMSA."""

    handle: int
    vcpu_index: int


@attrs.frozen
class TransportPacket:
    """An exported page or VMSA: 0x34-byte header and TEK-encrypted payload."""

    header: bytes = attrs.field(repr=False)
    ciphertext: bytes = attrs.field(repr=False)


@attrs.frozen
class ReceiveStartRequest:
    """RECEIVE_START: the policy and session SEND_START produced on the source."""

    policy: Policy
    dh_cert: bytes = attrs.field(repr=False)
    session: bytes = attrs.field(repr=False)


@attrs.frozen
class ReceiveUpdateDataRequest:
    """RECEIVE_UPDATE_DATA: authenticate and import a packet at ``gpa``."""

    handle: int
    header: bytes = attrs.field(repr=False)
    ciphertext: bytes = attrs.field(repr=False)
    gpa: int


@attrs.frozen
class ReceiveUpdateVmsaRequest:
    """RECEIVE_UPDATE_VMSA (SEV-ES): authenticate and import one vCPU's VMSA."""

    handle: int
    vcpu_index: int
    header: bytes = attrs.field(repr=False)
    ciphertext: bytes = attrs.field(repr=False)


@attrs.frozen
class GuestStatus:
    """GUEST_STATUS: a guest's policy and state."""

    handle: int
    policy: Policy
    state: GuestState


@attrs.frozen
class PlatformStatus:
    """PLATFORM_STATUS: firmware version and number of guest contexts."""

    firmware: FirmwareVersion
    guest_count: int


@attrs.frozen
class PdhCertExport:
    """PDH_CERT_EXPORT: the PDH certificate and PEK || OCA || CEK."""

    pdh_cert: bytes = attrs.field(repr=False)
    certs: bytes = attrs.field(repr=False)
