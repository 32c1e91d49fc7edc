"""The emulated PSP: one host's identity plus the guest contexts of this process.

A :class:`Psp` object dispatches commands: it serialises them (a PSP runs one
command at a time), looks up the guest, checks its state against
:data:`.guest.ALLOWED_STATES`, runs the command (:mod:`.launch`,
:mod:`.send_receive`), tags any :class:`PspError` with the command, and
accounts the modelled cost (:mod:`.cost`).

Per host, per process: the *identity* (chain, PDH) is loaded from the host's
state directory, so every machine process of a host presents the same PDH;
guest contexts live in the object, and handles are unique within it.  The
VEK of a guest never appears in a command's output; ACTIVATE loads it into
the machine's memory-controller key slot, which is where hardware puts it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from vmmig.platforms.emu.psp import launch, send_receive
from vmmig.platforms.emu.psp.chain import PlatformChain
from vmmig.platforms.emu.psp.cost import Pacer, PspCostModel
from vmmig.platforms.emu.psp.guest import (
    ALLOWED_STATES,
    GuestContext,
    GuestMemoryReader,
    GuestMemoryWriter,
    MemoryKeySlot,
    VmsaReader,
    VmsaWriter,
)
from vmmig.platforms.emu.psp.identity import PlatformIdentity
from vmmig.platforms.emu.psp.messages import (
    GuestStatus,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    PdhCertExport,
    PlatformStatus,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendStartRequest,
    SendStartResponse,
    SendUpdateDataRequest,
    SendUpdateVmsaRequest,
    TransportPacket,
)
from vmmig.platforms.emu.psp.packets import Measurement
from vmmig.platforms.emu.psp.policy import FirmwareVersion, require_key_sharing
from vmmig.platforms.emu.psp.root import EmulatedAmdRoot
from vmmig.platforms.emu.psp.status import PspError, PspStatus, SevCommand


__all__ = ["Psp"]


class Psp:
    """An emulated AMD Secure Processor implementing the SEV API subset migration needs.

    :param identity: the host's platform identity.
    :param cost: the cost model (defaults are documented assumptions).
    :param pace: really wait the modelled time (for benchmarks); tests leave it off.
    """

    def __init__(
        self, identity: PlatformIdentity, *, cost: PspCostModel | None = None, pace: bool = False
    ) -> None:
        self.identity = identity
        self.cost = cost if cost is not None else PspCostModel()
        #: Total modelled time of all commands so far, in seconds.
        self.modelled_seconds = 0.0
        #: Number of commands run so far (refused ones included).
        self.command_count = 0
        self._pacer = Pacer() if pace else None
        self._lock = threading.Lock()
        self._guests: dict[int, GuestContext] = {}
        self._next_handle = 1

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        *,
        host_name: str,
        root: EmulatedAmdRoot | None = None,
        firmware: FirmwareVersion | None = None,
        cost: PspCostModel | None = None,
        pace: bool = False,
    ) -> Psp:
        """The PSP of host ``host_name``, its identity kept in ``state_dir``.

        See :meth:`PlatformIdentity.load_or_create` for ``root`` and ``firmware``.
        """
        identity = PlatformIdentity.load_or_create(
            state_dir, host_name=host_name, root=root, firmware=firmware
        )
        return cls(identity, cost=cost, pace=pace)

    @property
    def firmware(self) -> FirmwareVersion:
        """The emulated firmware version."""
        return self.identity.firmware

    @property
    def chain(self) -> PlatformChain:
        """PDH, PEK, OCA, CEK, ASK and ARK certificates of this platform."""
        return self.identity.chain

    @contextlib.contextmanager
    def _command(self, command: SevCommand, nbytes: int = 0) -> Iterator[None]:
        seconds = self.cost.seconds(nbytes)
        with self._lock:
            started = self._pacer.now() if self._pacer is not None else 0.0
            self.command_count += 1
            self.modelled_seconds += seconds
            try:
                yield
            except PspError as err:
                err.command = command
                raise
            finally:
                if self._pacer is not None:
                    self._pacer.wait(started, seconds)

    def _guest(self, command: SevCommand, handle: int) -> GuestContext:
        ctx = self._guests.get(handle)
        if ctx is None:
            raise PspError(PspStatus.INVALID_GUEST, f"no guest with handle {handle}")
        if ctx.state not in ALLOWED_STATES[command]:
            raise PspError(
                PspStatus.INVALID_GUEST_STATE,
                f"guest {handle} is {ctx.state.name}; {command.name} needs "
                + "/".join(sorted(s.name for s in ALLOWED_STATES[command])),
            )
        return ctx

    # Platform commands.

    def platform_status(self) -> PlatformStatus:
        """PLATFORM_STATUS: firmware version and guest count."""
        with self._command(SevCommand.PLATFORM_STATUS):
            return PlatformStatus(self.firmware, len(self._guests))

    def pdh_cert_export(self) -> PdhCertExport:
        """PDH_CERT_EXPORT: the PDH certificate and PEK || OCA || CEK."""
        with self._command(SevCommand.PDH_CERT_EXPORT):
            return PdhCertExport(self.chain.pdh, self.chain.plat_certs)

    # Guest management.

    def guest_status(self, handle: int) -> GuestStatus:
        """GUEST_STATUS: the guest's policy and state."""
        with self._command(SevCommand.GUEST_STATUS):
            ctx = self._guest(SevCommand.GUEST_STATUS, handle)
            return GuestStatus(handle, ctx.policy, ctx.state)

    def activate(self, handle: int, key_slot: MemoryKeySlot) -> None:
        """ACTIVATE: load the guest's VEK into its memory-controller key slot."""
        with self._command(SevCommand.ACTIVATE):
            key_slot.load_key(self._guest(SevCommand.ACTIVATE, handle).vek)

    def decommission(self, handle: int) -> None:
        """DECOMMISSION: forget the guest context (and its keys)."""
        with self._command(SevCommand.DECOMMISSION):
            self._guest(SevCommand.DECOMMISSION, handle)
            del self._guests[handle]

    # Launch.

    def launch_start(self, req: LaunchStartRequest) -> int:
        """LAUNCH_START: unwrap the owner's session; return the new guest's handle."""
        with self._command(SevCommand.LAUNCH_START):
            shared_vek = None
            if req.share_handle:
                other = self._guests.get(req.share_handle)
                if other is None:
                    raise PspError(
                        PspStatus.INVALID_GUEST,
                        f"no guest with handle {req.share_handle} to share keys with",
                    )
                require_key_sharing(req.policy, other.policy)
                shared_vek = other.vek
            ctx = launch.launch_start(self.identity, req, self._next_handle, shared_vek)
            return self._insert(ctx)

    def launch_update_data(self, req: LaunchUpdateDataRequest, memory: GuestMemoryWriter) -> None:
        """LAUNCH_UPDATE_DATA: measure ``req.data`` and write it at ``req.gpa``."""
        with self._command(SevCommand.LAUNCH_UPDATE_DATA, len(req.data)):
            ctx = self._guest(SevCommand.LAUNCH_UPDATE_DATA, req.handle)
            launch.launch_update_data(ctx, req, memory)

    def launch_update_vmsa(self, req: LaunchUpdateVmsaRequest, memory: VmsaWriter) -> None:
        """LAUNCH_UPDATE_VMSA (SEV-ES): measure and seal a vCPU's initial VMSA."""
        with self._command(SevCommand.LAUNCH_UPDATE_VMSA, len(req.vmsa)):
            ctx = self._guest(SevCommand.LAUNCH_UPDATE_VMSA, req.handle)
            launch.launch_update_vmsa(ctx, req, memory)

    def launch_measure(self, handle: int) -> Measurement:
        """LAUNCH_MEASURE: MEASURE and MNONCE; the guest moves to LSECRET."""
        with self._command(SevCommand.LAUNCH_MEASURE):
            return launch.launch_measure(
                self._guest(SevCommand.LAUNCH_MEASURE, handle), self.identity
            )

    def launch_secret(self, req: LaunchSecretRequest, memory: GuestMemoryWriter) -> None:
        """LAUNCH_SECRET: verify and inject the owner's secret at ``req.gpa``."""
        with self._command(SevCommand.LAUNCH_SECRET, len(req.ciphertext)):
            ctx = self._guest(SevCommand.LAUNCH_SECRET, req.handle)
            launch.launch_secret(ctx, req, memory)

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH: the guest is RUNNING."""
        with self._command(SevCommand.LAUNCH_FINISH):
            launch.launch_finish(self._guest(SevCommand.LAUNCH_FINISH, handle))

    # Send.

    def send_start(self, req: SendStartRequest) -> SendStartResponse:
        """SEND_START: validate the target chain and open a session to its PDH."""
        with self._command(SevCommand.SEND_START):
            ctx = self._guest(SevCommand.SEND_START, req.handle)
            return send_receive.send_start(self.identity, ctx, req)

    def send_update_data(
        self, req: SendUpdateDataRequest, memory: GuestMemoryReader
    ) -> TransportPacket:
        """SEND_UPDATE_DATA: export ``req.length`` bytes at ``req.gpa`` as a packet."""
        with self._command(SevCommand.SEND_UPDATE_DATA, req.length):
            ctx = self._guest(SevCommand.SEND_UPDATE_DATA, req.handle)
            return send_receive.send_update_data(ctx, req, memory)

    def send_update_vmsa(self, req: SendUpdateVmsaRequest, memory: VmsaReader) -> TransportPacket:
        """SEND_UPDATE_VMSA (SEV-ES): export a vCPU's VMSA as a packet."""
        with self._command(SevCommand.SEND_UPDATE_VMSA, launch.VMSA_SIZE):
            ctx = self._guest(SevCommand.SEND_UPDATE_VMSA, req.handle)
            return send_receive.send_update_vmsa(ctx, req, memory)

    def send_finish(self, handle: int) -> None:
        """SEND_FINISH: the guest is SENT and must never run here again."""
        with self._command(SevCommand.SEND_FINISH):
            send_receive.send_finish(self._guest(SevCommand.SEND_FINISH, handle))

    def send_cancel(self, handle: int) -> None:
        """SEND_CANCEL: abandon the outgoing migration; the guest is RUNNING."""
        with self._command(SevCommand.SEND_CANCEL):
            send_receive.send_cancel(self._guest(SevCommand.SEND_CANCEL, handle))

    # Receive.

    def receive_start(self, req: ReceiveStartRequest) -> int:
        """RECEIVE_START: unwrap the source's session; return the new guest's handle."""
        with self._command(SevCommand.RECEIVE_START):
            return self._insert(send_receive.receive_start(self.identity, req, self._next_handle))

    def receive_update_data(self, req: ReceiveUpdateDataRequest, memory: GuestMemoryWriter) -> None:
        """RECEIVE_UPDATE_DATA: authenticate and import a packet at ``req.gpa``."""
        with self._command(SevCommand.RECEIVE_UPDATE_DATA, len(req.ciphertext)):
            ctx = self._guest(SevCommand.RECEIVE_UPDATE_DATA, req.handle)
            send_receive.receive_update_data(ctx, req, memory)

    def receive_update_vmsa(self, req: ReceiveUpdateVmsaRequest, memory: VmsaWriter) -> None:
        """RECEIVE_UPDATE_VMSA (SEV-ES): authenticate and import a vCPU's VMSA."""
        with self._command(SevCommand.RECEIVE_UPDATE_VMSA, len(req.ciphertext)):
            ctx = self._guest(SevCommand.RECEIVE_UPDATE_VMSA, req.handle)
            send_receive.receive_update_vmsa(ctx, req, memory)

    def receive_finish(self, handle: int) -> None:
        """RECEIVE_FINISH: the guest is RUNNING here."""
        with self._command(SevCommand.RECEIVE_FINISH):
            send_receive.receive_finish(self._guest(SevCommand.RECEIVE_FINISH, handle))

    def _insert(self, ctx: GuestContext) -> int:
        self._guests[ctx.handle] = ctx
        self._next_handle += 1
        return ctx.handle
