"""SEND_* and RECEIVE_*: the PSP's own migration path (kept for comparison).

The source PSP checks the target's chain up to the ARK it trusts, makes
fresh TEK/TIK and wraps them to the target's PDH with the launch session's
construction (:mod:`.session`); the hypervisor carries the session, the
source's ephemeral DH certificate and the policy to the target's
RECEIVE_START.  Pages then travel as transport packets: AES-128-CTR under the
TEK with a fresh IV each, authenticated with the TIK (formats in
:mod:`.packets`).  A target MAC failure is BAD_MEASUREMENT and writes nothing.

As with launch, every check runs before the first side effect.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from vmmig.platforms.emu.psp.chain import ChainError, PlatformChain, verify_chain
from vmmig.platforms.emu.psp.guest import (
    GuestContext,
    GuestMemoryReader,
    GuestMemoryWriter,
    GuestState,
    VmsaReader,
    VmsaWriter,
)
from vmmig.platforms.emu.psp.identity import PlatformIdentity
from vmmig.platforms.emu.psp.launch import (
    VEK_SIZE,
    VMSA_SIZE,
    check_aligned,
    check_vmsa,
    open_incoming_session,
)
from vmmig.platforms.emu.psp.messages import (
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateVmsaRequest,
    TransportPacket,
)
from vmmig.platforms.emu.psp.packets import PacketHeader, TransportKind, transport_mac
from vmmig.platforms.emu.psp.policy import require_firmware, require_sendable
from vmmig.platforms.emu.psp.primitives import aes128_ctr
from vmmig.platforms.emu.psp.session import TransportKeys, open_session
from vmmig.platforms.emu.psp.status import PspError, PspStatus, parse_or_fail


__all__ = [
    "receive_finish",
    "receive_start",
    "receive_update_data",
    "receive_update_vmsa",
    "send_cancel",
    "send_finish",
    "send_start",
    "send_update_data",
    "send_update_vmsa",
]


def send_start(
    identity: PlatformIdentity, ctx: GuestContext, req: SendStartRequest
) -> SendStartResponse:
    """SEND_START: validate the target, open a session to its PDH; go to SUPDATE."""
    require_sendable(ctx.policy)
    try:
        chain = PlatformChain.from_buffers(req.pdh_cert, req.plat_certs, req.amd_certs)
        target = verify_chain(chain, identity.ark_public_key)
    except ChainError as err:
        status = PspStatus.BAD_SIGNATURE if err.bad_signature else PspStatus.INVALID_CERTIFICATE
        raise PspError(status, f"target {err}") from None
    require_firmware(ctx.policy, target.api_major, target.api_minor, "the target's")
    if ctx.policy.domain and chain.oca != identity.chain.oca:
        raise PspError(
            PspStatus.POLICY_FAILURE, "policy DOMAIN: the target has another owner (OCA)"
        )
    keys = TransportKeys(tek=os.urandom(16), tik=os.urandom(16))
    session, dh_cert = open_session(target.key, keys, ctx.policy)
    ctx.send_keys = keys
    ctx.state = GuestState.SUPDATE
    return SendStartResponse(ctx.policy, dh_cert, session)


def _seal(keys: TransportKeys | None, kind: TransportKind, plaintext: bytes) -> TransportPacket:
    if keys is None:  # unreachable while SUPDATE is entered only by SEND_START
        raise PspError(PspStatus.INVALID_GUEST_STATE, "no outgoing session")
    iv = os.urandom(16)
    ciphertext = aes128_ctr(keys.tek, iv, plaintext)
    header = PacketHeader(0, iv, transport_mac(keys.tik, kind, 0, iv, ciphertext))
    return TransportPacket(header.to_bytes(), ciphertext)


def send_update_data(
    ctx: GuestContext, req: SendUpdateDataRequest, memory: GuestMemoryReader
) -> TransportPacket:
    """SEND_UPDATE_DATA: read a private range's plaintext and seal it for the target."""
    check_aligned(req.gpa, req.length)
    plaintext = memory.read_private(req.gpa, req.length)
    if len(plaintext) != req.length:
        raise PspError(
            PspStatus.INVALID_ADDRESS,
            f"memory returned {len(plaintext)} of {req.length} bytes at {req.gpa:#x}",
        )
    return _seal(ctx.send_keys, TransportKind.DATA, plaintext)


def send_update_vmsa(
    ctx: GuestContext, req: SendUpdateVmsaRequest, memory: VmsaReader
) -> TransportPacket:
    """SEND_UPDATE_VMSA: read a vCPU's VMSA and seal it for the target."""
    check_vmsa(ctx, req.vcpu_index, VMSA_SIZE)
    vmsa = memory.read_vmsa(req.vcpu_index)
    if len(vmsa) != VMSA_SIZE:
        raise PspError(
            PspStatus.INVALID_LENGTH,
            f"memory returned a {len(vmsa)}-byte VMSA for vCPU {req.vcpu_index}",
        )
    return _seal(ctx.send_keys, TransportKind.VMSA, vmsa)


def send_finish(ctx: GuestContext) -> None:
    """SEND_FINISH: the image now belongs to the target; the guest is SENT, never to run here."""
    ctx.send_keys = None
    ctx.state = GuestState.SENT


def send_cancel(ctx: GuestContext) -> None:
    """SEND_CANCEL: abandon the outgoing migration; the guest is RUNNING again."""
    ctx.send_keys = None
    ctx.state = GuestState.RUNNING


def receive_start(
    identity: PlatformIdentity, req: ReceiveStartRequest, handle: int
) -> GuestContext:
    """RECEIVE_START: a new context in RUPDATE with a fresh VEK."""
    keys = open_incoming_session(identity, req.policy, req.dh_cert, req.session)
    return GuestContext(
        handle, req.policy, GuestState.RUPDATE, os.urandom(VEK_SIZE), keys, hashlib.sha256()
    )


def _open(ctx: GuestContext, kind: TransportKind, header_bytes: bytes, ciphertext: bytes) -> bytes:
    header = parse_or_fail(
        PspStatus.INVALID_LENGTH, "packet header", lambda: PacketHeader.from_bytes(header_bytes)
    )
    if header.flags:
        raise PspError(PspStatus.UNSUPPORTED, f"header flags {header.flags:#x}: only 0 is emulated")
    expected = transport_mac(ctx.keys.tik, kind, header.flags, header.iv, ciphertext)
    if not hmac.compare_digest(expected, header.mac):
        raise PspError(PspStatus.BAD_MEASUREMENT, f"{kind.name} packet MAC does not verify")
    return aes128_ctr(ctx.keys.tek, header.iv, ciphertext)


def receive_update_data(
    ctx: GuestContext, req: ReceiveUpdateDataRequest, memory: GuestMemoryWriter
) -> None:
    """RECEIVE_UPDATE_DATA: authenticate, decrypt and place a packet at ``gpa``."""
    check_aligned(req.gpa, len(req.ciphertext))
    memory.write_private(req.gpa, _open(ctx, TransportKind.DATA, req.header, req.ciphertext))


def receive_update_vmsa(
    ctx: GuestContext, req: ReceiveUpdateVmsaRequest, memory: VmsaWriter
) -> None:
    """RECEIVE_UPDATE_VMSA: authenticate, decrypt and seal a vCPU's VMSA."""
    check_vmsa(ctx, req.vcpu_index, len(req.ciphertext))
    memory.write_vmsa(req.vcpu_index, _open(ctx, TransportKind.VMSA, req.header, req.ciphertext))
    ctx.vcpus |= {req.vcpu_index}


def receive_finish(ctx: GuestContext) -> None:
    """RECEIVE_FINISH: the guest is complete and may run here."""
    if ctx.policy.es and not ctx.vcpus:
        raise PspError(
            PspStatus.POLICY_FAILURE, "an SEV-ES guest cannot run without a received VMSA"
        )
    ctx.state = GuestState.RUNNING
