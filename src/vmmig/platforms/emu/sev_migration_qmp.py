"""The PSP's own migration path (SEND_* / RECEIVE_*) over QMP: the slow baseline.

AMD's QEMU migration series ran these PSP commands inside QEMU, one
SEND_UPDATE_DATA per page, during its RAM iteration; here they are QMP
commands, so a migration agent (or a test) drives the PSP path itself and
its cost can be measured against the guest-assisted path.  Every command
below fails with ``GenericError``; a PSP refusal's description is
``SEV: <COMMAND>: <STATUS> (0x<code>): <reason>``, as in
``SEV: SEND_START: POLICY_FAILURE (0x07): policy NOSEND forbids migrating
this guest``, and the machine keeps serving.  Byte strings are base64.

Source side, on a launched (or received) guest whose launch is finished:

``x-sev-send-start {"pdh-cert": B64, "plat-certs": B64, "*amd-certs": B64}``
    SEND_START.  ``pdh-cert`` is the target host's PDH certificate and
    ``plat-certs`` its PEK || OCA || CEK (the ``pdh`` and ``cert-chain`` of the
    target's ``query-sev-capabilities``); ``amd-certs`` is ASK || ARK, by
    default this host's own (the hosts of one deployment share the AMD root;
    QEMU's operators pass ``sev-amd-cert`` from AMD's key server).  The PSP
    verifies the chain up to its ARK, refuses under policy NOSEND (and
    DOMAIN towards another owner, or a target below the policy's firmware)
    and wraps fresh TEK/TIK to the target's PDH.  Returns
    ``{"policy": int, "dh-cert": B64, "session": B64}``: the policy word
    (u32), the source PSP's ephemeral DH certificate (an SEV certificate,
    0x824 bytes, :mod:`.psp.sev_cert`) and the 0x80-byte session blob
    NONCE (16) || WRAP_TK (32) || WRAP_IV (16) || WRAP_MAC (32) ||
    POLICY_MAC (32) (:mod:`.psp.session`): exactly ``x-sev-receive-start``'s
    arguments.  The machine may be running or paused.
``x-sev-send-update-data {"gpa": int, "length": int}``
    SEND_UPDATE_DATA of ``[gpa, gpa + length)``: whole pages, page-aligned,
    at most :data:`MAX_TRANSFER` (1 MiB) a call (KVM's ioctl moves at most one
    page a call; this emulator lets a caller batch).  Returns
    ``{"packet-header": B64, "data": B64}``: the 0x34-byte packet header
    FLAGS (u32 LE, 0) || IV (16) || MAC (32, HMAC-SHA256 under the TIK;
    :mod:`.psp.packets`) and the ``length`` bytes of AES-128-CTR(TEK, IV)
    transport ciphertext.  As in the spec, a packet binds neither its GPA
    nor its order: the target hypervisor chooses where it lands.  Neither
    the VEK nor plaintext reaches the hypervisor.  The guest may run: the PSP
    allows it in SUPDATE, and pre-copy re-sends what it dirties, as QEMU's
    RAM iteration did.
``x-sev-send-update-pages {"gpas": [int]}``
    One SEND_UPDATE_DATA per page, as KVM's ioctl does it, for up to
    :data:`MAX_BATCH_PAGES` pages in one QMP exchange (the PSP's cost is per
    command; the batch only saves QMP round trips).  Returns ``{"packets":
    [{"packet-header": B64, "data": B64}, ...]}`` in the order of ``gpas``.
``x-sev-send-update-vmsa {"vcpu": int}``
    SEND_UPDATE_VMSA (SEV-ES only; the PSP refuses an SEV guest with
    POLICY_FAILURE, its registers go through ``x-vcpu-state-export``).  The
    machine must be stopped, since a running vCPU's save area is in use.
    Returns ``{"packet-header": B64, "data": B64}`` (4096 bytes of data).
``x-sev-send-finish``
    SEND_FINISH: the guest is SENT and never runs here again (``cont`` is
    refused by the PSP: no clone).  The machine must be stopped; its status
    becomes ``postmigrate``.
``x-sev-send-cancel``
    SEND_CANCEL: the guest is RUNNING again here and may ``cont``.

Target side, on a machine started with ``--incoming`` (``--tech sev|sev-es
--host-dir DIR``, no owner's launch inputs): no guest context, no program,
private RAM without a key, status ``inmigrate``:

``x-sev-receive-start {"policy": int, "dh-cert": B64, "session": B64}``
    RECEIVE_START with what ``x-sev-send-start`` returned, then ACTIVATE of
    the new guest's (fresh) VEK into this machine's memory key slot; the
    policy's ES bit must match the machine's technology.  Returns
    ``{"handle": int}``.
``x-sev-receive-update-data {"packet-header": B64, "data": B64, "gpa": int}``
    RECEIVE_UPDATE_DATA: the PSP checks the packet's MAC (a flipped bit is
    BAD_MEASUREMENT and writes nothing), decrypts it and stores it at
    ``gpa`` under this guest's VEK.  The same page rules as sending.
``x-sev-receive-update-pages {"packets": [{"gpa": int, "packet-header": B64, "data": B64}]}``
    RECEIVE_UPDATE_DATA of each one-page packet, in order; the first refusal
    stops the batch (the packets before it are stored).
``x-sev-receive-update-vmsa {"vcpu": int, "packet-header": B64, "data": B64}``
    RECEIVE_UPDATE_VMSA (SEV-ES): the vCPU starts from the imported save
    area, which the host never sees.
``x-sev-receive-finish``
    RECEIVE_FINISH: the guest may run here.  ``cont`` is refused before it;
    after it an SEV guest needs its registers by ``x-vcpu-state-import`` (the
    hypervisor may set them, KVM_SET_REGS), an SEV-ES guest has its VMSAs.

Before ``x-sev-receive-start`` (and on a plain machine) the commands that
need a guest fail with ``SEV: no guest context ...`` (``SEV not enabled for
guest`` on a plain machine), before any PSP command runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Final, Protocol

from vmmig.agents.pages import PAGE
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.psp import (
    Policy,
    Psp,
    PspError,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendStartRequest,
    SendUpdateDataRequest,
    SendUpdateVmsaRequest,
    TransportPacket,
)
from vmmig.platforms.emu.qmp_schema import CommandTable, QmpCommandError
from vmmig.platforms.emu.sev_launch import PspPort, SevConfig, SevGuest, host_psp
from vmmig.platforms.emu.sev_qmp import b64, unb64
from vmmig.platforms.emu.vcpu import Vcpu


__all__ = ["MAX_BATCH_PAGES", "MAX_TRANSFER", "MigratingMachine", "SevMigrationCommands"]

#: The most guest bytes one ``x-sev-send-update-data`` or ``x-sev-receive-update-data`` moves.
MAX_TRANSFER: Final = 1 << 20
#: The most pages one ``x-sev-send-update-pages`` or ``x-sev-receive-update-pages`` moves.
MAX_BATCH_PAGES: Final = 256


class MigratingMachine(Protocol):
    """What the commands use of a machine (:class:`~.machine.Machine`)."""

    #: The guest context; set by ``x-sev-receive-start`` on an incoming machine.
    sev: SevGuest | None
    #: QEMU's run state; ``x-sev-send-finish`` makes it ``postmigrate``.
    status: str

    @property
    def memory(self) -> GuestMemory:
        """Guest RAM, whose key slot RECEIVE_START's ACTIVATE loads."""

    @property
    def vcpus(self) -> Sequence[Vcpu]:
        """The vCPUs, whose save areas RECEIVE_UPDATE_VMSA loads."""


@contextlib.contextmanager
def _psp_refusals() -> Iterator[None]:
    """A PSP refusal as the QMP error the caller sees, naming the command and status."""
    try:
        yield
    except PspError as err:
        raise QmpCommandError("GenericError", f"SEV: {err}") from None


def _check_pages(gpa: int, length: int) -> None:
    if gpa < 0 or gpa % PAGE or length <= 0 or length % PAGE or length > MAX_TRANSFER:
        raise QmpCommandError("GenericError", f"SEV: [{gpa:#x}, +{length:#x}) is not whole "
                              f"pages at a page boundary, 1 to {MAX_TRANSFER} bytes")


def _check_batch(count: int) -> None:
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise QmpCommandError("GenericError", f"SEV: a batch is 1 to {MAX_BATCH_PAGES} pages, "
                              f"not {count}")


def _packet(packet: TransportPacket) -> dict[str, object]:
    return {"packet-header": b64(packet.header), "data": b64(packet.ciphertext)}


class SevMigrationCommands:
    """The ``x-sev-send-*`` and ``x-sev-receive-*`` commands of one machine.

    :param machine: the machine the commands act on.
    :param config: its SEV launch inputs; None for a plain machine.
    :param incoming: whether it was started as a migration target; then its
        host's PSP is loaded now, to answer before a guest context exists.
    """

    def __init__(self, machine: MigratingMachine, config: SevConfig | None, *,
                 incoming: bool) -> None:
        self._machine = machine
        self._config = config
        #: The host PSP of an incoming SEV machine (RECEIVE_START's); None otherwise.
        self.host: Psp | None = None
        if config is not None and incoming:
            self.host = host_psp(config.host_dir, config.amd_root, cost=config.cost)

    def register(self, table: CommandTable) -> None:
        """Add the commands to a machine's table."""
        for name, handler in (
            ("x-sev-send-start", self.send_start),
            ("x-sev-send-update-data", self.send_update_data),
            ("x-sev-send-update-pages", self.send_update_pages),
            ("x-sev-send-update-vmsa", self.send_update_vmsa),
            ("x-sev-send-finish", self.send_finish),
            ("x-sev-send-cancel", self.send_cancel),
            ("x-sev-receive-start", self.receive_start),
            ("x-sev-receive-update-data", self.receive_update_data),
            ("x-sev-receive-update-pages", self.receive_update_pages),
            ("x-sev-receive-update-vmsa", self.receive_update_vmsa),
            ("x-sev-receive-finish", self.receive_finish),
        ):
            table.add(name, handler)

    def _guest(self) -> SevGuest:
        guest = self._machine.sev
        if guest is not None:
            return guest
        if self._config is None:
            raise QmpCommandError("GenericError", "SEV not enabled for guest")
        raise QmpCommandError("GenericError", "SEV: no guest context on this machine yet: "
                              "x-sev-receive-start creates it")

    def _require_stopped(self, action: str) -> None:
        if self._machine.status == "running":
            raise QmpCommandError("GenericError", f"SEV: {action} needs a stopped guest: "
                                  "run 'stop' first")

    # -- source ----------------------------------------------------------------------

    def send_start(self, pdh_cert: str, plat_certs: str,
                   amd_certs: str | None = None) -> dict[str, object]:
        """SEND_START towards the target host whose PDH and chain are given."""
        guest = self._guest()
        amd = guest.psp.chain.amd_certs if amd_certs is None else unb64(amd_certs, "amd-certs")
        request = SendStartRequest(guest.handle, unb64(pdh_cert, "pdh-cert"),
                                   unb64(plat_certs, "plat-certs"), amd)
        with _psp_refusals():
            started = guest.psp.send_start(request)
        return {"policy": started.policy.value, "dh-cert": b64(started.dh_cert),
                "session": b64(started.session)}

    def send_update_data(self, gpa: int, length: int) -> dict[str, object]:
        """SEND_UPDATE_DATA: whole pages as a transport packet."""
        guest = self._guest()
        _check_pages(gpa, length)
        with _psp_refusals():
            packet = guest.psp.send_update_data(
                SendUpdateDataRequest(guest.handle, gpa, length), guest.port)
        return _packet(packet)

    def send_update_pages(self, gpas: list[int]) -> dict[str, object]:
        """One SEND_UPDATE_DATA per page (as KVM), batched in one QMP exchange."""
        guest = self._guest()
        _check_batch(len(gpas))
        for gpa in gpas:
            _check_pages(gpa, PAGE)
        with _psp_refusals():
            packets = [guest.psp.send_update_data(SendUpdateDataRequest(guest.handle, gpa, PAGE),
                                                  guest.port) for gpa in gpas]
        return {"packets": [_packet(packet) for packet in packets]}

    def send_update_vmsa(self, vcpu: int) -> dict[str, object]:
        """SEND_UPDATE_VMSA (SEV-ES) of a stopped vCPU."""
        guest = self._guest()
        self._require_stopped("x-sev-send-update-vmsa")
        with _psp_refusals():
            packet = guest.psp.send_update_vmsa(SendUpdateVmsaRequest(guest.handle, vcpu),
                                                guest.port)
        return _packet(packet)

    def send_finish(self) -> None:
        """SEND_FINISH: the guest is SENT; the stopped machine is ``postmigrate``."""
        guest = self._guest()
        self._require_stopped("x-sev-send-finish")
        with _psp_refusals():
            guest.psp.send_finish(guest.handle)
        self._machine.status = "postmigrate"

    def send_cancel(self) -> None:
        """SEND_CANCEL: the guest may run here again."""
        guest = self._guest()
        with _psp_refusals():
            guest.psp.send_cancel(guest.handle)

    # -- target ----------------------------------------------------------------------

    def receive_start(self, policy: int, dh_cert: str, session: str) -> dict[str, object]:
        """RECEIVE_START and ACTIVATE: this machine gets the incoming guest's context."""
        psp = self.host
        if psp is None or self._config is None or self._machine.sev is not None:
            raise QmpCommandError("GenericError", "SEV: x-sev-receive-start needs an incoming "
                                  "SEV machine without a guest context (--incoming)")
        try:
            word = Policy.from_value(policy)
        except ValueError as err:
            raise QmpCommandError("GenericError", f"SEV: policy {policy:#x}: {err}") from None
        es = self._config.policy.es
        if word.es != es:
            raise QmpCommandError("GenericError", f"SEV: policy {policy:#x} "
                                  f"{'lacks' if es else 'sets'} ES (bit 2): this machine is "
                                  f"{'sev-es' if es else 'sev'}")
        request = ReceiveStartRequest(word, unb64(dh_cert, "dh-cert"), unb64(session, "session"))
        port = PspPort(self._machine.memory, self._machine.vcpus)
        with _psp_refusals():
            handle = psp.receive_start(request)
            psp.activate(handle, port)
        self._machine.sev = SevGuest(psp, handle, port, None, es=es)
        return {"handle": handle}

    def receive_update_data(self, packet_header: str, data: str, gpa: int) -> None:
        """RECEIVE_UPDATE_DATA: the PSP authenticates and stores a packet at ``gpa``."""
        guest = self._guest()
        ciphertext = unb64(data, "data")
        _check_pages(gpa, len(ciphertext))
        request = ReceiveUpdateDataRequest(guest.handle, unb64(packet_header, "packet-header"),
                                           ciphertext, gpa)
        with _psp_refusals():
            guest.psp.receive_update_data(request, guest.port)

    def receive_update_pages(self, packets: list[dict[str, Any]]) -> None:
        """RECEIVE_UPDATE_DATA of each one-page packet, in order."""
        _check_batch(len(packets))
        for packet in packets:
            try:
                gpa, header, data = packet["gpa"], packet["packet-header"], packet["data"]
            except KeyError as err:
                raise QmpCommandError("GenericError", f"SEV: a packet lacks {err}") from None
            if not isinstance(gpa, int) or not isinstance(header, str) \
                    or not isinstance(data, str):
                raise QmpCommandError("GenericError", "SEV: a packet is {gpa: int, "
                                      "packet-header: str, data: str}")
            self.receive_update_data(header, data, gpa)

    def receive_update_vmsa(self, vcpu: int, packet_header: str, data: str) -> None:
        """RECEIVE_UPDATE_VMSA (SEV-ES): the PSP seals a vCPU's save area into it."""
        guest = self._guest()
        request = ReceiveUpdateVmsaRequest(guest.handle, vcpu,
                                           unb64(packet_header, "packet-header"),
                                           unb64(data, "data"))
        with _psp_refusals():
            guest.psp.receive_update_vmsa(request, guest.port)

    def receive_finish(self) -> None:
        """RECEIVE_FINISH: the guest may run here (``cont``)."""
        guest = self._guest()
        with _psp_refusals():
            guest.psp.receive_finish(guest.handle)
