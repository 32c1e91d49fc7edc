"""The owner's launch over QMP: QEMU's SEV commands, for QEMU and the emulated machine alike.

The launch session must exist before the VM does (QEMU's ``sev-guest`` takes
``dh-cert-file`` and ``session-file`` at start), so a launch takes two calls
around the VM's start::

    files = launch_files(owner, "web-1", platform, workdir)   # before the start
    ... start the VM paused (-S) with files.emu_options() (QEMU: sev-guest's properties)
    await attest_and_inject(owner, "web-1", qmp.execute, session=files.offer.session)
    ... cont

:func:`attest_and_inject` reads ``query-sev`` (state and firmware version),
``query-sev-capabilities`` (the platform's PDH) and
``query-sev-launch-measure``, asks the owner for the secret, and passes the
packet to ``sev-inject-launch-secret`` without a GPA: the firmware
advertises its secret area, as OVMF does.  Everything it forwards is public
or sealed for the measured VM, so it may run on the untrusted host.

``owner`` is a :class:`~vmmig.owner.GuestOwner` or an
:class:`~vmmig.owner.client.OwnerClient`: both are blocking, and are called
in a worker thread so that the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs

from vmmig.errors import PlatformError
from vmmig.owner.expected import LaunchKind
from vmmig.owner.guest_owner import LaunchOffer, PlatformCerts
from vmmig.platforms.emu.psp import FirmwareVersion, Measurement, PlatformChain, SecretPacket
from vmmig.platforms.emu.psp.store import b64


__all__ = ["LaunchFiles", "OwnerService", "QmpExecute", "attest_and_inject", "launch_files",
           "query_platform"]

#: An async QMP call: (command, arguments) -> the ``return`` value.  Fits
#: :meth:`QmpProcess.execute <vmmig.platforms.qmp_process.QmpProcess.execute>`
#: and :meth:`qemu.qmp.QMPClient.execute`.
QmpExecute = Callable[[str, Mapping[str, object]], Awaitable[Any]]


class OwnerService(Protocol):
    """What a launch needs of the guest owner, in process or remote."""

    def start_launch(self, guest: str, platform: PlatformChain | PlatformCerts, *,
                     kind: LaunchKind = LaunchKind.BOOT) -> LaunchOffer:
        """See :meth:`vmmig.owner.GuestOwner.start_launch`."""
        ...

    def release_secret(self, guest: str, session: str, measurement: bytes,
                       firmware: FirmwareVersion, *, platform_pdh: bytes | None = None
                       ) -> SecretPacket:
        """See :meth:`vmmig.owner.GuestOwner.release_secret`."""
        ...


@attrs.frozen
class LaunchFiles:
    """A launch session written as QEMU's ``sev-guest`` reads it (base64 files)."""

    offer: LaunchOffer
    dh_cert_file: Path
    session_file: Path

    def emu_options(self) -> list[str]:
        """The ``vmmig emu start`` options that launch with this session."""
        return ["--policy", f"{self.offer.policy.value:#x}",
                "--dh-cert-file", str(self.dh_cert_file),
                "--session-file", str(self.session_file)]


def _unb64(reply: Mapping[str, Any], field: str, command: str) -> bytes:
    """A base64 field of a QMP reply; the host is untrusted, so check it."""
    try:
        return base64.b64decode(reply[field], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise PlatformError(f"{command} returned no base64 {field!r}") from None


def launch_files(owner: OwnerService, guest: str, platform: PlatformChain | PlatformCerts,
                 directory: Path, *, kind: LaunchKind = LaunchKind.BOOT) -> LaunchFiles:
    """Start a launch of ``guest`` on ``platform`` and write its DH certificate and session.

    :param kind: :attr:`~LaunchKind.MIGRATION_TARGET` for a machine started
        with ``--incoming --mh-target``.
    :raises AttestationError: the owner refused the platform or the guest.
    """
    offer = owner.start_launch(guest, platform, kind=kind)
    stem = directory / f"{guest}.{offer.session[:8]}"
    files = LaunchFiles(offer, stem.with_name(f"{stem.name}.dh-cert.b64"),
                        stem.with_name(f"{stem.name}.session.b64"))
    files.dh_cert_file.write_text(b64(offer.dh_cert) + "\n")
    files.session_file.write_text(b64(offer.session_blob) + "\n")
    return files


async def query_platform(qmp_execute: QmpExecute) -> PlatformCerts:
    """The platform's PDH and PEK || OCA || CEK, from ``query-sev-capabilities``."""
    caps = await qmp_execute("query-sev-capabilities", {})
    return PlatformCerts(_unb64(caps, "pdh", "query-sev-capabilities"),
                         _unb64(caps, "cert-chain", "query-sev-capabilities"))


def _firmware(info: Mapping[str, Any]) -> FirmwareVersion:
    try:
        return FirmwareVersion(info["api-major"], info["api-minor"], info["build-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise PlatformError(f"query-sev reported no firmware version: {err}") from None


async def attest_and_inject(owner: OwnerService, guest: str, qmp_execute: QmpExecute, *,
                            session: str) -> Measurement:
    """Have the owner check the paused VM's launch measurement, and inject its secret.

    :param session: the handle of the launch session the VM was started with.
    :returns: the measurement the owner accepted.
    :raises PlatformError: the VM is not an SEV guest awaiting its secret.
    :raises AttestationError: the owner refused; nothing was injected.
    """
    info = await qmp_execute("query-sev", {})
    if not info.get("enabled") or info.get("state") != "launch-secret":
        raise PlatformError(f"the VM is not an SEV guest awaiting its launch secret "
                            f"(query-sev: enabled {info.get('enabled')}, "
                            f"state {info.get('state')})")
    platform = await query_platform(qmp_execute)
    measure = await qmp_execute("query-sev-launch-measure", {})
    blob = _unb64(measure, "data", "query-sev-launch-measure")
    packet = await asyncio.to_thread(owner.release_secret, guest, session, blob,
                                     _firmware(info), platform_pdh=platform.pdh)
    await qmp_execute("sev-inject-launch-secret", {"packet-header": b64(packet.header),
                                                   "secret": b64(packet.ciphertext)})
    return Measurement.from_bytes(blob)

