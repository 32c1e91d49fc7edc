"""The guest owner: attests launches and releases each guest's master secret.

One launch, as the owner sees it::

    offer = owner.start_launch("web-1", platform)     # chain verified, session made
    ... host: LAUNCH_START(offer.policy, offer.dh_cert, offer.session_blob), UPDATE_*,
              MEASURE -> blob; query-sev gives the firmware version
    packet = owner.release_secret("web-1", offer.session, blob, firmware)
    ... host: LAUNCH_SECRET(packet.header, packet.ciphertext), FINISH

A migration target launches with ``kind=LaunchKind.MIGRATION_TARGET`` and is
measured against the guest's target expectation; the session keeps the
expectation it was made for, so its release is the same call.

:meth:`GuestOwner.start_launch` verifies the platform's certificate chain up
to the pinned AMD root before it wraps fresh TEK/TIK to that platform's PDH:
only a genuine PSP can unwrap them, and only it can then compute a MEASURE
under the TIK.  :meth:`GuestOwner.release_secret` recomputes the MEASURE the
expected launch yields and encrypts the secret table to that VM only if the
reported one matches.  Each session takes one measurement: presented once,
right or wrong, it is spent, so a host cannot probe the owner with
variations.  Every decision goes to the audit log before it takes effect.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import attrs

from vmmig.owner.audit import AuditEvent, AuditLog
from vmmig.owner.errors import AttestationError, Refusal
from vmmig.owner.expected import ExpectedLaunch, LaunchKind, check_firmware, check_policy
from vmmig.owner.secret_table import MIGRATION_SECRET_GUID, build_secret_table
from vmmig.owner.state import OwnerState, TrustAnchor, check_guest_id
from vmmig.platforms.emu.psp import (
    ChainError,
    FirmwareVersion,
    Measurement,
    PdhPublicKey,
    PlatformChain,
    Policy,
    SecretPacket,
    build_launch_session,
    build_secret_packet,
    expected_measurement,
    verify_chain,
)


__all__ = ["GuestOwner", "LaunchOffer", "PlatformCerts"]

#: Launch sessions awaiting their measurement; the oldest is forgotten beyond this.
MAX_PENDING: Final = 256
#: Spent session handles remembered to name a replay as such (a forgotten one is "unknown").
MAX_SPENT: Final = 4096

_T = TypeVar("_T")


@attrs.frozen
class PlatformCerts:
    """A platform's certificates as buffers, as QEMU's ``query-sev-capabilities`` reports them.

    :ivar pdh: the PDH certificate.
    :ivar cert_chain: PEK || OCA || CEK.
    :ivar amd_certs: ASK || ARK as the platform gave them; None to complete
        the chain with the ASK and ARK the owner pinned.
    """

    pdh: bytes = attrs.field(repr=False)
    cert_chain: bytes = attrs.field(repr=False)
    amd_certs: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, chain: PlatformChain) -> PlatformCerts:
        """A whole chain as buffers."""
        return cls(chain.pdh, chain.plat_certs, chain.amd_certs)


@attrs.frozen
class LaunchOffer:
    """What the host needs for LAUNCH_START: QEMU's ``policy``, ``dh-cert-file``, ``session-file``.

    :ivar session: the owner's handle of this launch session, for
        :meth:`GuestOwner.release_secret`.
    """

    session: str
    policy: Policy
    dh_cert: bytes = attrs.field(repr=False)
    session_blob: bytes = attrs.field(repr=False)


@attrs.frozen
class _Pending:
    """A launch session awaiting its measurement (keys never leave the owner)."""

    guest: str
    launch: ExpectedLaunch
    pdh: bytes = attrs.field(repr=False)
    tek: bytes = attrs.field(repr=False)
    tik: bytes = attrs.field(repr=False)


def _chain_refusal(err: ChainError) -> Refusal:
    """ASK -> CEK failing means AMD's key did not endorse this chip: another root's platform."""
    return Refusal.UNKNOWN_PLATFORM if err.link == "ASK -> CEK" else Refusal.BAD_CHAIN


def _pdh_id(pdh: bytes) -> str:
    return hashlib.sha256(pdh).hexdigest()[:16]


class GuestOwner:
    """The tenant's key service, in process (serve it with :mod:`vmmig.owner.service`).

    :param state: the owner's directory (trust anchor, expectations, secrets).
    :param audit: where decisions go; by default ``audit.jsonl`` in the state directory.
    """

    def __init__(self, state: OwnerState, audit: AuditLog | None = None) -> None:
        self.state = state
        self.audit = AuditLog(state.directory / "audit.jsonl") if audit is None else audit
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._spent: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def open(cls, directory: Path, trust: TrustAnchor | None = None) -> GuestOwner:
        """The owner kept in ``directory``; ``trust`` pins the AMD root on first use.

        :raises ConfigError: no root pinned and none given, or another one given.
        """
        return cls(OwnerState(directory, trust))

    @property
    def trust(self) -> TrustAnchor:
        """The pinned AMD certificates."""
        return self.state.trust

    def _decide(self, action: str, guest: str, session: str | None,
                decide: Callable[[], tuple[_T, str]]) -> _T:
        """Run ``decide`` and log its outcome; an AttestationError is logged and re-raised."""
        try:
            result, detail = decide()
        except AttestationError as err:
            self.audit.record(AuditEvent(action, guest, False, session, err.reason, err.detail))
            raise
        self.audit.record(AuditEvent(action, guest, True, session, detail=detail))
        return result

    def expect(self, guest: str, launch: ExpectedLaunch) -> None:
        """Record how ``guest`` must launch (the tenant's act, never the host's).

        :raises AttestationError: POLICY_REFUSED for a policy the owner forbids.
        """
        check_guest_id(guest)

        def decide() -> tuple[None, str]:
            check_policy(guest, launch)
            self.state.expect(guest, launch)
            return None, f"{launch.kind} {launch.tech} policy {launch.policy.value:#x} " \
                         f"digest {launch.digest.hex()[:16]}"

        self._decide("expect", guest, None, decide)

    def start_launch(self, guest: str, platform: PlatformChain | PlatformCerts, *,
                     kind: LaunchKind = LaunchKind.BOOT) -> LaunchOffer:
        """A launch session for ``guest`` on ``platform``, after verifying its chain.

        :param platform: the platform's chain; without ASK and ARK it is
            completed with the pinned ones.
        :param kind: which of the guest's expected launches the VM must measure as.
        :raises AttestationError: UNKNOWN_GUEST (no expectation of ``kind``),
            UNKNOWN_PLATFORM (another AMD root), BAD_CHAIN (a link does not
            verify), POLICY_REFUSED (the guest's policy, or firmware older
            than it requires).
        """
        check_guest_id(guest)

        def decide() -> tuple[LaunchOffer, str]:
            launch = self._expected(guest, kind)
            check_policy(guest, launch)
            pdh = self._verify(guest, platform)
            check_firmware(guest, launch, pdh.api_major, pdh.api_minor, "the platform's PEK")
            keys = build_launch_session(pdh, launch.policy)
            handle = secrets.token_hex(16)
            self._pending[handle] = _Pending(guest, launch, pdh.cert, keys.tek, keys.tik)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
            offer = LaunchOffer(handle, launch.policy, keys.dh_cert, keys.session)
            return offer, f"{kind} pdh {_pdh_id(pdh.cert)} api {pdh.api_major}.{pdh.api_minor}"

        return self._decide("start-launch", guest, None, decide)

    def release_secret(self, guest: str, session: str, measurement: bytes,
                       firmware: FirmwareVersion, *, platform_pdh: bytes | None = None
                       ) -> SecretPacket:
        """The LAUNCH_SECRET packet carrying ``guest``'s secret table, if the launch is genuine.

        :param session: the handle of the :class:`LaunchOffer` the VM was launched with.
        :param measurement: LAUNCH_MEASURE's blob, MEASURE || MNONCE.
        :param firmware: the version the host reports (``query-sev``); the
            MEASURE binds it, so a false one only fails the comparison.
        :param platform_pdh: the PDH of the platform the VM runs on (QEMU's
            ``query-sev-capabilities``), to name a VM on another platform
            plainly; the PSP's MEASURE is the real check.
        :raises AttestationError: UNKNOWN_SESSION, REPLAYED_SESSION,
            UNKNOWN_PLATFORM, MEASUREMENT_MISMATCH or POLICY_REFUSED; the
            session is spent either way.
        """

        def decide() -> tuple[SecretPacket, str]:
            pending = self._spend(guest, session)
            if platform_pdh is not None and platform_pdh != pending.pdh:
                raise AttestationError(Refusal.UNKNOWN_PLATFORM, guest,
                                       f"the VM runs on pdh {_pdh_id(platform_pdh)}, the "
                                       f"session was made for pdh {_pdh_id(pending.pdh)}")
            try:
                measured = Measurement.from_bytes(measurement)
            except ValueError as err:
                raise AttestationError(Refusal.MEASUREMENT_MISMATCH, guest, str(err)) from None
            expected = expected_measurement(
                tik=pending.tik, firmware=firmware, policy=pending.launch.policy,
                launch_digest=pending.launch.digest, mnonce=measured.mnonce)
            if not hmac.compare_digest(expected, measured.measure):
                raise AttestationError(
                    Refusal.MEASUREMENT_MISMATCH, guest,
                    f"MEASURE is not the expected {pending.launch.kind} launch's (digest "
                    f"{pending.launch.digest.hex()[:16]}, policy "
                    f"{pending.launch.policy.value:#x}, firmware {firmware})")
            check_firmware(guest, pending.launch, firmware.api_major, firmware.api_minor,
                           "the measured launch")
            table = build_secret_table({MIGRATION_SECRET_GUID: self.state.master_secret(guest)})
            packet = build_secret_packet(pending.tek, pending.tik, measured, table)
            return packet, f"mnonce {measured.mnonce.hex()} firmware {firmware}"

        return self._decide("release-secret", guest, session, decide)

    def _expected(self, guest: str, kind: LaunchKind) -> ExpectedLaunch:
        launch = self.state.expected(guest, kind)
        if launch is None:
            raise AttestationError(Refusal.UNKNOWN_GUEST, guest,
                                   f"no expected {kind} launch is recorded for it")
        return launch

    def _verify(self, guest: str, platform: PlatformChain | PlatformCerts) -> PdhPublicKey:
        trust = self.state.trust
        try:
            if isinstance(platform, PlatformCerts):
                platform = PlatformChain.from_buffers(
                    platform.pdh, platform.cert_chain, platform.amd_certs or trust.amd_certs)
            if platform.ark != trust.ark:
                raise AttestationError(Refusal.UNKNOWN_PLATFORM, guest,
                                       "its chain leads to another AMD root (ARK)")
            return verify_chain(platform, trust.ark_public_key)
        except ChainError as err:
            raise AttestationError(_chain_refusal(err), guest, str(err)) from None

    def _spend(self, guest: str, session: str) -> _Pending:
        """Take ``session`` out of the pending ones: it serves one measurement only."""
        pending = self._pending.pop(session, None)
        if pending is None:
            reason = Refusal.REPLAYED_SESSION if session in self._spent \
                else Refusal.UNKNOWN_SESSION
            raise AttestationError(reason, guest, f"session {session[:12]!r} is not pending")
        self._spent[session] = None
        while len(self._spent) > MAX_SPENT:
            self._spent.popitem(last=False)
        if pending.guest != guest:
            raise AttestationError(Refusal.UNKNOWN_SESSION, guest,
                                   f"session {session[:12]!r} was made for another guest")
        return pending
