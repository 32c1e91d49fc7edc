"""The launch of an SEV or SEV-ES machine: what QEMU's ``sev-guest`` object and KVM do.

QEMU starts an SEV guest in five steps, and so does an emulated machine,
with its host's PSP (:mod:`vmmig.platforms.emu.psp`):

1. LAUNCH_START with the owner's policy, DH certificate and session (QEMU's
   ``policy``, ``dh-cert-file`` and ``session-file``), then ACTIVATE, which
   puts the new guest's VEK into the machine's memory key slot
   (:meth:`GuestMemory.load_key`): from then on the host sees only
   ciphertext of the guest's RAM.
2. LAUNCH_UPDATE_DATA over the launch image, in place, as QEMU does with the
   firmware flash: :data:`LAUNCH_IMAGE`, the first MiB, where the loader put
   the program, its page tables, GDT, block and the secret area.
3. SEV-ES only: LAUNCH_UPDATE_VMSA of every vCPU's initial save area, by
   index.  The PSP hands it to the vCPU; the host never sets those registers.
4. LAUNCH_MEASURE: the guest is in LSECRET, and the machine in QEMU's
   ``prelaunch`` state when started with ``-S``: the owner checks the
   measurement and injects its secret (:mod:`.sev_qmp`).
5. LAUNCH_FINISH when the guest first runs (``cont``), as QEMU's
   ``sev_vm_state_change`` does.

The owner computes the digest it expects with :func:`launch_chunks` over
the same image, as a real owner hashes the OVMF build it gave the host.

The PSP reaches the machine only through :class:`PspPort` (its memory and
VMSA protocols): plaintext goes straight from the PSP into guest RAM and the
vCPUs, and the VEK straight into the memory's key slot; neither is kept
anywhere else.

Host state: ``--host-dir DIR`` is one emulated host's PSP state
(``DIR/psp-identity.json``, see :mod:`.psp.identity`), shared by every machine
process of that host; the host is named after the directory.  The emulated
AMD root (``amd-root.json``, :mod:`.psp.root`), which endorses a host when
its identity is first made, is in ``--amd-root DIR``, by default the host
directory itself; the hosts of one deployment, between which guests
migrate, share one root directory, and the guest owner trusts its ARK.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import attrs

from vmmig.errors import ConfigError, PlatformError
from vmmig.guests.emu import DATA_START
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.psp import (
    EmulatedAmdRoot,
    GuestState,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    Measurement,
    Policy,
    Psp,
    PspCostModel,
    PspError,
    PspStatus,
)
from vmmig.platforms.emu.vcpu import Vcpu
from vmmig.platforms.emu.vmsa import Vmsa


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = [
    "LAUNCH_IMAGE",
    "SECRET_AREA",
    "SEV_TECHS",
    "PspPort",
    "SevConfig",
    "SevGuest",
    "check_sev_config",
    "host_psp",
    "launch_chunks",
]

#: The technologies whose machines launch through the PSP.
SEV_TECHS: Final = ("sev", "sev-es")
#: QEMU's default ``sev-guest`` policy per technology: NODBG, plus ES for SEV-ES.
DEFAULT_POLICY: Final = {"sev": 0x1, "sev-es": 0x5}
#: [start, end) of the measured launch image: everything the loader writes.
LAUNCH_IMAGE: Final = (0, DATA_START)
#: (gpa, size) of the launch secret area, which the emulated firmware
#: advertises as OVMF does with its SEV secret GUID table entry; inside the
#: launch image, clear of the page tables, stack and program.
SECRET_AREA: Final = (0xF0000, 0x1000)


@attrs.frozen
class SevConfig:
    """The launch inputs of an SEV machine: QEMU's ``sev-guest`` properties.

    :ivar policy: the guest policy (ES set exactly for SEV-ES).
    :ivar dh_cert: the owner's DH certificate (decoded ``dh-cert-file``);
        empty for an incoming machine, whose guest context comes from the
        source's SEND_START (:mod:`.sev_migration_qmp`).
    :ivar session: the owner's launch session blob (decoded ``session-file``);
        empty for an incoming machine.
    :ivar host_dir: the host's PSP state directory.
    :ivar amd_root: the emulated AMD root's directory; None for ``host_dir``.
    :ivar cost: the PSP's modelled command cost (documented assumptions).
    """

    policy: Policy
    dh_cert: bytes = attrs.field(repr=False)
    session: bytes = attrs.field(repr=False)
    host_dir: Path
    amd_root: Path | None = None
    cost: PspCostModel = attrs.Factory(PspCostModel)

    @classmethod
    def from_options(
        cls,
        tech: str,
        *,
        policy: str | None,
        dh_cert_file: str | None,
        session_file: str | None,
        host_dir: str | None,
        amd_root: str | None,
        cost: PspCostModel | None = None,
        incoming: bool = False,
    ) -> SevConfig | None:
        """The launch inputs ``vmmig emu start`` was given; None for a plain machine.

        An ``incoming`` machine is launched by no owner: it takes no DH
        certificate or session, only its host (and policy, for its technology).

        :raises ConfigError: an option is missing, unreadable or malformed,
            or given to a plain machine.
        """
        given = {"policy": policy, "dh-cert-file": dh_cert_file, "session-file": session_file,
                 "host-dir": host_dir, "amd-root": amd_root}
        if tech not in SEV_TECHS:
            extra = [f"--{name}" for name, value in given.items() if value is not None]
            if extra:
                raise ConfigError("tech", f"only sev and sev-es machines take "
                                  f"{', '.join(extra)}; this one is {tech}")
            return None
        host = _required("host-dir", host_dir, tech)
        if incoming:
            launch_inputs = [f"--{name}" for name in ("dh-cert-file", "session-file")
                             if given[name] is not None]
            if launch_inputs:
                raise ConfigError("incoming", f"an incoming {tech} machine takes no "
                                  f"{', '.join(launch_inputs)}: its guest context comes from "
                                  "the source's SEND_START (x-sev-receive-start)")
            dh_cert = session = b""
        else:
            dh_cert = _read_base64("dh-cert-file",
                                   _required("dh-cert-file", dh_cert_file, tech))
            session = _read_base64("session-file",
                                   _required("session-file", session_file, tech))
        config = cls(
            policy=_parse_policy(policy, tech),
            dh_cert=dh_cert,
            session=session,
            host_dir=host,
            amd_root=None if amd_root is None else Path(amd_root),
            cost=cost or PspCostModel(),
        )
        check_sev_config(tech, config)
        return config


def _required(name: str, value: str | None, tech: str) -> Path:
    if value is None:
        raise ConfigError(name, f"--{name} is required for --tech {tech}: the emulated PSP "
                          "launches a guest only under its owner's session, made for this "
                          "host's PDH")
    return Path(value)


def _parse_policy(text: str | None, tech: str) -> Policy:
    try:
        word = DEFAULT_POLICY[tech] if text is None else int(text, 0)
        return Policy.from_value(word)
    except ValueError as err:
        raise ConfigError("policy", f"{text!r} is not a policy word: {err}") from None


def _read_base64(field: str, path: Path) -> bytes:
    """A file of base64 text, as QEMU reads ``dh-cert-file`` and ``session-file``."""
    try:
        text = path.read_bytes()
    except OSError as err:
        raise ConfigError(field, f"cannot read {path}: {err.strerror}") from None
    try:
        data = base64.b64decode(b"".join(text.split()), validate=True)
    except binascii.Error:
        raise ConfigError(field, f"{path} is not base64") from None
    if not data:
        raise ConfigError(field, f"{path} is empty")
    return data


def check_sev_config(tech: str, sev: SevConfig | None) -> None:
    """Refuse a technology without its launch inputs, or a policy that contradicts it.

    :raises ConfigError: naming the field.
    """
    if tech == "plain":
        if sev is not None:
            raise ConfigError("tech", "SEV launch inputs apply to sev and sev-es machines only")
        return
    if tech not in SEV_TECHS:
        raise ConfigError("tech", f"{tech!r} is not an emulated technology; "
                          "choose plain, sev or sev-es")
    if sev is None:
        raise ConfigError("tech", f"an {tech} machine needs its launch inputs "
                          "(host directory, owner's DH certificate and session)")
    word = sev.policy.value
    if tech == "sev-es" and not sev.policy.es:
        raise ConfigError("policy", f"{word:#x} lacks ES (bit 2, 0x4), which an sev-es "
                          "machine needs")
    if tech == "sev" and sev.policy.es:
        raise ConfigError("policy", f"{word:#x} sets ES (bit 2, 0x4): that is an sev-es "
                          "machine (--tech sev-es)")


def host_psp(host_dir: Path, amd_root: Path | None = None, *,
             cost: PspCostModel | None = None) -> Psp:
    """The PSP of the emulated host kept in ``host_dir``, created on first use.

    The host is named after the directory; ``amd_root`` (default
    ``host_dir``) holds the emulated AMD root that endorses it.  A guest
    owner calls this too, as a real one runs ``sevctl export`` on the host,
    to get the chain it then verifies against the AMD root.

    The root is read only to endorse a new host: loading its RSA-4096 keys
    costs 0.6 s, which every machine start would pay.  A host whose chain
    leads to another ARK still fails, at the owner's :func:`verify_chain`.

    :raises PlatformError: the host directory belongs to another host or
        root, or is broken.
    """
    name = host_dir.resolve().name
    try:
        return Psp.load_or_create(host_dir, host_name=name, cost=cost)
    except PlatformError:
        # No identity yet, most likely; any other problem the second try reports again.
        root = EmulatedAmdRoot.load_or_create(host_dir if amd_root is None else amd_root)
        return Psp.load_or_create(host_dir, host_name=name, root=root, cost=cost)


def launch_chunks(ram: Buffer, vmsas: Sequence[Vmsa], *, es: bool) -> list[bytes]:
    """What the launch measures, in order: the launch image, then (SEV-ES) each VMSA.

    :param ram: guest RAM (or a copy the owner loaded the same way).
    :param vmsas: every vCPU's initial registers, by index.
    :param es: whether the guest is SEV-ES.
    """
    start, end = LAUNCH_IMAGE
    with memoryview(ram) as view:
        chunks = [bytes(view[start:end])]
    if es:
        chunks += [vmsa.pack() for vmsa in vmsas]
    return chunks


class PspPort:
    """The machine as the PSP touches it: private RAM, vCPU save areas, the key slot.

    Implements the PSP's ``GuestMemoryWriter``, ``GuestMemoryReader``,
    ``VmsaWriter``, ``VmsaReader`` and ``MemoryKeySlot`` protocols.  Guest
    RAM holds what the guest sees (the memory controller's plaintext view),
    so private plaintext is written straight into it; the host's view is
    encrypted by :class:`GuestMemory` on the way out.
    """

    def __init__(self, memory: GuestMemory, vcpus: Sequence[Vcpu]) -> None:
        self._memory = memory
        self._vcpus = vcpus

    def _check(self, gpa: int, n: int) -> None:
        if gpa < 0 or n < 0 or gpa + n > self._memory.size:
            raise PspError(PspStatus.INVALID_ADDRESS, f"[{gpa:#x}, {gpa + n:#x}) is not "
                           f"inside guest RAM of {self._memory.size:#x} bytes")

    def _vcpu(self, index: int) -> Vcpu:
        if not 0 <= index < len(self._vcpus):
            raise PspError(PspStatus.INVALID_PARAM, f"no vCPU {index}")
        return self._vcpus[index]

    def write_private(self, gpa: int, plaintext: bytes) -> None:
        """Place plaintext in private guest memory (LAUNCH_UPDATE_DATA, LAUNCH_SECRET)."""
        self._check(gpa, len(plaintext))
        self._memory.ram[gpa:gpa + len(plaintext)] = plaintext

    def read_private(self, gpa: int, n: int) -> bytes:
        """The plaintext of private guest memory (SEND_UPDATE_DATA)."""
        self._check(gpa, n)
        return self._memory.ram[gpa:gpa + n]

    def write_vmsa(self, vcpu_index: int, plaintext: bytes) -> None:
        """Load a vCPU's save area (LAUNCH_UPDATE_VMSA, RECEIVE_UPDATE_VMSA)."""
        self._vcpu(vcpu_index).load_vmsa(Vmsa.unpack(plaintext))

    def read_vmsa(self, vcpu_index: int) -> bytes:
        """A vCPU's save area (SEND_UPDATE_VMSA)."""
        return self._vcpu(vcpu_index).save_vmsa().pack()

    def load_key(self, vek: bytes) -> None:
        """ACTIVATE: the memory controller encrypts this guest's RAM under ``vek``."""
        self._memory.load_key(vek)


class SevGuest:
    """A machine's SEV guest context: its PSP, handle and launch measurement.

    Build one with :meth:`launch`, or by RECEIVE_START (:mod:`.sev_migration_qmp`).
    QEMU's SEV QMP commands read it (:mod:`.sev_qmp`).
    """

    def __init__(self, psp: Psp, handle: int, port: PspPort, measurement: Measurement | None,
                 *, es: bool) -> None:
        self.psp = psp
        self.handle = handle
        self.port = port
        #: LAUNCH_MEASURE's result, kept as QEMU keeps it for ``query-sev-launch-measure``;
        #: None for a guest received by migration (never measured on this host).
        self.measurement = measurement
        self.es = es

    @classmethod
    def launch(cls, config: SevConfig, memory: GuestMemory, vcpus: Sequence[Vcpu],
               vmsas: Sequence[Vmsa]) -> SevGuest:
        """Steps 1-4 of the module doc over a loaded machine; the guest ends in LSECRET.

        :param vmsas: the vCPUs' initial registers; for SEV-ES the PSP loads
            them, for SEV the caller does, as KVM_SET_REGS.
        :raises ConfigError: the PSP refused the owner's launch inputs.
        """
        psp = host_psp(config.host_dir, config.amd_root, cost=config.cost)
        port = PspPort(memory, vcpus)
        try:
            handle = psp.launch_start(
                LaunchStartRequest(config.policy, config.dh_cert, config.session))
        except PspError as err:
            raise ConfigError("session-file", f"the PSP refused the owner's launch "
                              f"session: {err}") from None
        psp.activate(handle, port)
        start, end = LAUNCH_IMAGE
        psp.launch_update_data(
            LaunchUpdateDataRequest(handle, start, memory.ram[start:end]), port)
        if config.policy.es:
            for index, vmsa in enumerate(vmsas):
                psp.launch_update_vmsa(LaunchUpdateVmsaRequest(handle, index, vmsa.pack()), port)
        return cls(psp, handle, port, psp.launch_measure(handle), es=config.policy.es)

    @property
    def state(self) -> GuestState:
        """The guest's state in the PSP (GUEST_STATUS)."""
        return self.psp.guest_status(self.handle).state

    def inject_secret(self, header: bytes, ciphertext: bytes, gpa: int) -> None:
        """LAUNCH_SECRET: the PSP verifies the owner's packet and writes the secret at ``gpa``.

        :raises PspError: the guest is not in LSECRET, or the packet does not verify.
        """
        self.psp.launch_secret(LaunchSecretRequest(self.handle, header, ciphertext, gpa),
                               self.port)

    def finish(self) -> None:
        """LAUNCH_FINISH, if the launch is not finished yet.

        :raises PspError: the guest may not run here (e.g. it was sent away).
        """
        state = self.state
        if state is GuestState.LSECRET:
            self.psp.launch_finish(self.handle)
        elif not state.runnable:
            raise PspError(PspStatus.INVALID_GUEST_STATE,
                           f"guest {self.handle} is {state.name} and may not run")

    def close(self) -> None:
        """DECOMMISSION: the PSP forgets the guest and its keys."""
        self.psp.decommission(self.handle)
