"""LAUNCH_* commands: start a guest under the owner's session, measure it, take its secret.

Each function gets a guest context the PSP has already looked up and found
in an allowed state (:data:`.guest.ALLOWED_STATES`).  Every check runs before
the first side effect, so a refused command leaves guest memory and the
context as they were.  Alignment rules follow the spec: addresses and
lengths of LAUNCH_UPDATE_DATA and LAUNCH_SECRET are multiples of 16 bytes
(the AES block); a VMSA is one 4 KiB page.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from vmmig.platforms.emu.psp.guest import (
    GuestContext,
    GuestMemoryWriter,
    GuestState,
    VmsaWriter,
)
from vmmig.platforms.emu.psp.identity import PlatformIdentity
from vmmig.platforms.emu.psp.messages import (
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
)
from vmmig.platforms.emu.psp.packets import Measurement, PacketHeader, measurement_mac, secret_mac
from vmmig.platforms.emu.psp.policy import Policy, require_es, require_firmware
from vmmig.platforms.emu.psp.primitives import aes128_ctr
from vmmig.platforms.emu.psp.session import SessionBlob, TransportKeys, unwrap_session
from vmmig.platforms.emu.psp.sev_cert import Algo, SevCert, Usage
from vmmig.platforms.emu.psp.status import PspError, PspStatus, parse_or_fail


__all__ = [
    "VEK_SIZE",
    "VMSA_SIZE",
    "check_aligned",
    "check_vmsa",
    "launch_finish",
    "launch_measure",
    "launch_secret",
    "launch_start",
    "launch_update_data",
    "launch_update_vmsa",
    "open_incoming_session",
]

#: Bytes of a VEK: two AES-128 keys for the memory controller's AES-XEX.
VEK_SIZE: Final = 32
#: Bytes of a VMSA (one page).
VMSA_SIZE: Final = 4096
_BLOCK: Final = 16


def check_aligned(gpa: int, length: int) -> None:
    """Require a 16-byte aligned address and a nonzero multiple-of-16 length.

    :raises PspError: INVALID_ADDRESS or INVALID_LENGTH.
    """
    if gpa < 0 or gpa % _BLOCK:
        raise PspError(PspStatus.INVALID_ADDRESS, f"gpa {gpa:#x} is not 16-byte aligned")
    if length <= 0 or length % _BLOCK:
        raise PspError(PspStatus.INVALID_LENGTH, f"length {length} is not a nonzero multiple of 16")


def check_vmsa(ctx: GuestContext, vcpu_index: int, length: int) -> None:
    """Require an ES guest, a valid vCPU index and a page-sized VMSA.

    :raises PspError: POLICY_FAILURE, INVALID_PARAM or INVALID_LENGTH.
    """
    require_es(ctx.policy)
    if vcpu_index < 0:
        raise PspError(PspStatus.INVALID_PARAM, f"vCPU index {vcpu_index} is negative")
    if length != VMSA_SIZE:
        raise PspError(PspStatus.INVALID_LENGTH, f"a VMSA is {VMSA_SIZE} bytes, got {length}")


def open_incoming_session(
    identity: PlatformIdentity, policy: Policy, dh_cert: bytes, session: bytes
) -> TransportKeys:
    """Unwrap TEK/TIK sent to this PSP's PDH (LAUNCH_START and RECEIVE_START).

    :raises PspError: POLICY_FAILURE (firmware too old), INVALID_CERTIFICATE,
        INVALID_LENGTH or BAD_MEASUREMENT.
    """
    firmware = identity.firmware
    require_firmware(policy, firmware.api_major, firmware.api_minor, "this platform's")
    peer = parse_or_fail(
        PspStatus.INVALID_CERTIFICATE, "DH certificate", lambda: SevCert.from_bytes(dh_cert)
    )
    if peer.usage is not Usage.PDH or peer.algo not in (Algo.ECDH_SHA256, Algo.ECDH_SHA384):
        raise PspError(
            PspStatus.INVALID_CERTIFICATE,
            f"DH certificate is a {peer.usage.name}/{peer.algo.name} key, not ECDH",
        )
    blob = parse_or_fail(
        PspStatus.INVALID_LENGTH, "session", lambda: SessionBlob.from_bytes(session)
    )
    return unwrap_session(identity.pdh_secret(peer.public_key), blob, policy)


def launch_start(
    identity: PlatformIdentity, req: LaunchStartRequest, handle: int, shared_vek: bytes | None
) -> GuestContext:
    """LAUNCH_START: a new context in LUPDATE (``shared_vek`` when sharing keys)."""
    keys = open_incoming_session(identity, req.policy, req.dh_cert, req.session)
    vek = shared_vek if shared_vek is not None else os.urandom(VEK_SIZE)
    return GuestContext(handle, req.policy, GuestState.LUPDATE, vek, keys, hashlib.sha256())


def launch_update_data(
    ctx: GuestContext, req: LaunchUpdateDataRequest, memory: GuestMemoryWriter
) -> None:
    """LAUNCH_UPDATE_DATA: place ``data`` in private memory and extend the digest."""
    check_aligned(req.gpa, len(req.data))
    memory.write_private(req.gpa, req.data)
    ctx.digest.update(req.data)


def launch_update_vmsa(ctx: GuestContext, req: LaunchUpdateVmsaRequest, memory: VmsaWriter) -> None:
    """LAUNCH_UPDATE_VMSA: seal a vCPU's initial VMSA and extend the digest."""
    check_vmsa(ctx, req.vcpu_index, len(req.vmsa))
    if req.vcpu_index in ctx.vcpus:
        raise PspError(PspStatus.INVALID_PARAM, f"vCPU {req.vcpu_index}'s VMSA is already measured")
    memory.write_vmsa(req.vcpu_index, req.vmsa)
    ctx.digest.update(req.vmsa)
    ctx.vcpus |= {req.vcpu_index}


def launch_measure(ctx: GuestContext, identity: PlatformIdentity) -> Measurement:
    """LAUNCH_MEASURE: seal the digest into MEASURE with a fresh MNONCE; go to LSECRET."""
    if ctx.policy.es and not ctx.vcpus:
        raise PspError(
            PspStatus.POLICY_FAILURE,
            "an SEV-ES guest must have its VMSAs measured (LAUNCH_UPDATE_VMSA)",
        )
    mnonce = os.urandom(16)
    measure = measurement_mac(
        ctx.keys.tik, identity.firmware, ctx.policy, ctx.digest.digest(), mnonce
    )
    ctx.measure = measure
    ctx.state = GuestState.LSECRET
    return Measurement(measure, mnonce)


def launch_secret(ctx: GuestContext, req: LaunchSecretRequest, memory: GuestMemoryWriter) -> None:
    """LAUNCH_SECRET: check the owner's MAC, decrypt, and place the secret at ``gpa``."""
    header = parse_or_fail(
        PspStatus.INVALID_LENGTH, "packet header", lambda: PacketHeader.from_bytes(req.header)
    )
    if header.flags:
        raise PspError(PspStatus.UNSUPPORTED, f"header flags {header.flags:#x}: only 0 is emulated")
    check_aligned(req.gpa, len(req.ciphertext))
    if ctx.measure is None:  # unreachable while LSECRET is entered only by LAUNCH_MEASURE
        raise PspError(PspStatus.INVALID_GUEST_STATE, "the guest has not been measured")
    expected = secret_mac(ctx.keys.tik, header.flags, header.iv, req.ciphertext, ctx.measure)
    if not hmac.compare_digest(expected, header.mac):
        raise PspError(
            PspStatus.BAD_MEASUREMENT,
            "secret MAC does not verify (wrong TIK, measurement or ciphertext)",
        )
    memory.write_private(req.gpa, aes128_ctr(ctx.keys.tek, header.iv, req.ciphertext))


def launch_finish(ctx: GuestContext) -> None:
    """LAUNCH_FINISH: the guest is launched and may run."""
    ctx.state = GuestState.RUNNING
