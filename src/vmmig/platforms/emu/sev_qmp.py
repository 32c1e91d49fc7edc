"""QEMU's SEV QMP commands for an emulated machine, with QEMU's names, shapes and errors.

As in QEMU 7.2 (``qapi/misc-target.json``, ``target/i386/sev.c``):

``query-sev``
    ``SevInfo``: enabled, api-major, api-minor, build-id, policy, state,
    handle.  A machine without SEV answers ``enabled: false`` with zeros and
    state ``uninit``, as QEMU does; an incoming SEV machine before
    ``x-sev-receive-start`` (:mod:`.sev_migration_qmp`) answers
    ``enabled: true``, its host's firmware, state ``uninit`` and handle 0.
    States are QEMU's ``SevState`` names; ``sent`` (the PSP's SENT, which
    QEMU 7.2 does not list) is ours.
``query-sev-capabilities``
    ``SevCapability``: pdh and cert-chain (PEK || OCA || CEK, as
    PDH_CERT_EXPORT gives them), cpu0-id (the chip id, see :func:`chip_id`),
    all base64; cbitpos and reduced-phys-bits.
``query-sev-launch-measure``
    ``{"data": base64(MEASURE || MNONCE)}``, from LAUNCH_MEASURE onwards
    (a guest received by migration was never measured here: QEMU's error).
``sev-inject-launch-secret``
    ``packet-header`` and ``secret`` (base64, from
    :func:`~vmmig.platforms.emu.psp.build_secret_packet`), ``gpa`` optional:
    without it the secret goes to the firmware's secret area
    (:data:`~.sev_launch.SECRET_AREA`).  Only while the guest is in LSECRET,
    that is before ``cont``.

The error descriptions are QEMU's, with the PSP's reason appended where
QEMU appends the firmware error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from typing import Final

from vmmig.platforms.emu.psp import GuestState, Psp, PspError
from vmmig.platforms.emu.qmp_schema import CommandTable, QmpCommandError
from vmmig.platforms.emu.sev_launch import SECRET_AREA, SevGuest


__all__ = ["CBITPOS", "REDUCED_PHYS_BITS", "SevCommands", "b64", "chip_id", "unb64"]

#: The C-bit's position in a page table entry (CPUID 0x8000001F EBX[5:0]), as on EPYC.
CBITPOS: Final = 47
#: Physical address bits lost to SEV (QEMU reports 1).
REDUCED_PHYS_BITS: Final = 1

_STATES: Final = {
    GuestState.UNINIT: "uninit",
    GuestState.LUPDATE: "launch-update",
    GuestState.LSECRET: "launch-secret",
    GuestState.RUNNING: "running",
    GuestState.SUPDATE: "send-update",
    GuestState.RUPDATE: "receive-update",
    GuestState.SENT: "sent",
}


def chip_id(psp: Psp) -> bytes:
    """The 64-byte chip id (GET_ID2) of an emulated PSP: SHA-512 of its CEK certificate.

    A real id is fused into the chip and names its CEK at AMD's key server;
    this one is as stable and as unique as the emulated host's CEK.
    """
    return hashlib.sha512(psp.chain.cek).digest()


def b64(data: bytes) -> str:
    """``data`` as a QMP string: base64."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    """A base64 QMP argument's bytes; QEMU's error if it is not base64 or is empty."""
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        data = b""
    if not data:
        raise QmpCommandError("GenericError", f"SEV: Failed to decode {what}")
    return data


class SevCommands:
    """The SEV commands of one machine.

    :param guest: gives the machine's guest context now: None for a machine
        without SEV, and for an incoming one until ``x-sev-receive-start``.
    :param host: the PSP of an incoming SEV machine's host, which answers
        before there is a guest; None otherwise.
    """

    def __init__(self, guest: Callable[[], SevGuest | None], host: Psp | None = None) -> None:
        self._current = guest
        self._host = host

    @property
    def _guest(self) -> SevGuest | None:
        return self._current()

    def _psp(self) -> Psp | None:
        guest = self._guest
        return guest.psp if guest is not None else self._host

    def register(self, table: CommandTable) -> None:
        """Add the commands to a machine's table."""
        for name, handler in (
            ("query-sev", self.query_sev),
            ("query-sev-capabilities", self.query_sev_capabilities),
            ("query-sev-launch-measure", self.query_sev_launch_measure),
            ("sev-inject-launch-secret", self.sev_inject_launch_secret),
        ):
            table.add(name, handler)

    def query_sev(self) -> dict[str, object]:
        """QEMU's ``query-sev``."""
        guest, psp = self._guest, self._psp()
        if psp is None:
            return {"enabled": False, "api-major": 0, "api-minor": 0, "build-id": 0,
                    "policy": 0, "state": "uninit", "handle": 0}
        policy, state, handle = 0, GuestState.UNINIT, 0
        if guest is not None:
            status = psp.guest_status(guest.handle)
            policy, state, handle = status.policy.value, status.state, guest.handle
        firmware = psp.firmware
        return {"enabled": True, "api-major": firmware.api_major,
                "api-minor": firmware.api_minor, "build-id": firmware.build,
                "policy": policy, "state": _STATES[state], "handle": handle}

    def query_sev_capabilities(self) -> dict[str, object]:
        """QEMU's ``query-sev-capabilities``: the host PSP's PDH and chain."""
        psp = self._psp()
        if psp is None:
            raise QmpCommandError("GenericError", "SEV is not enabled in KVM")
        export = psp.pdh_cert_export()
        return {"pdh": b64(export.pdh_cert), "cert-chain": b64(export.certs),
                "cpu0-id": b64(chip_id(psp)), "cbitpos": CBITPOS,
                "reduced-phys-bits": REDUCED_PHYS_BITS}

    def query_sev_launch_measure(self) -> dict[str, object]:
        """QEMU's ``query-sev-launch-measure``."""
        guest = self._guest
        if guest is None or guest.measurement is None:
            raise QmpCommandError("GenericError", "SEV launch measurement is not available")
        return {"data": b64(guest.measurement.to_bytes())}

    def sev_inject_launch_secret(self, packet_header: str, secret: str,
                                 gpa: int | None = None) -> None:
        """QEMU's ``sev-inject-launch-secret``."""
        guest = self._guest
        if guest is None:
            raise QmpCommandError("GenericError", "SEV not enabled for guest")
        state = guest.state
        if state is not GuestState.LSECRET:
            raise QmpCommandError("GenericError",
                                  f"SEV: Not in correct state. (LSECRET) {state.value:x}")
        header = unb64(packet_header, "sequence header")
        data = unb64(secret, "data")
        try:
            guest.inject_secret(header, data, SECRET_AREA[0] if gpa is None else gpa)
        except PspError as err:
            raise QmpCommandError(
                "GenericError", f"SEV: failed to inject secret ret=-1 "
                f"fw_error={err.status.value} '{err}'") from None
