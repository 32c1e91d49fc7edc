"""The guest owner in process: fixed vectors, a genuine launch, and every refusal.

Launches here run against an emulated PSP with a fake guest memory
(:mod:`psp_support`); the same owner over QMP is in ``test_owner_qmp.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import struct
from unittest import mock

import attrs
import pytest
from owner_support import IMAGE, SEV, TARGET, TARGET_IMAGE, launch, trust
from psp_support import make_psp, page

from vmmig.errors import ConfigError, PlatformError
from vmmig.owner import (
    MIGRATION_SECRET_GUID,
    AttestationError,
    GuestOwner,
    LaunchKind,
    PlatformCerts,
    Refusal,
    TrustAnchor,
    parse_secret_table,
)
from vmmig.owner.secret_table import build_secret_table
from vmmig.platforms.emu.psp import (
    EmulatedAmdRoot,
    FirmwareVersion,
    GuestState,
    LaunchSecretRequest,
    Measurement,
    Policy,
    Psp,
    build_secret_packet,
    expected_measurement,
)
from vmmig.platforms.emu.psp.store import write_state


SECRET_GPA = 0x8000


@pytest.fixture(scope="module")
def psp(tmp_path_factory):
    return make_psp(tmp_path_factory.mktemp("owner-hosts"))


@pytest.fixture
def owner(tmp_path):
    owner = GuestOwner.open(tmp_path / "owner", trust())
    owner.expect("web-1", SEV)
    return owner


def refused(reason: Refusal, call, *args, **kwargs) -> AttestationError:
    with pytest.raises(AttestationError) as info:
        call(*args, **kwargs)
    assert info.value.reason is reason, info.value
    return info.value


class TestVectors:
    TIK, TEK = bytes(range(16)), bytes(range(16, 32))
    MNONCE, IV = bytes(range(32, 48)), bytes(range(48, 64))
    DIGEST = hashlib.sha256(b"vmmig owner vector image").digest()
    MEASURE = "5cc7d7511d0e304520bf68ac64bdde4297ec49bb55bc2c457bb8211db8404af6"

    def test_the_measurement_is_the_spec_hmac(self):
        """MEASURE = HMAC-SHA256(TIK, 04 || 1 55 21 || policy LE32 || digest || mnonce)."""
        ours = expected_measurement(tik=self.TIK, firmware=FirmwareVersion(1, 55, 21),
                                    policy=Policy(nodbg=True), launch_digest=self.DIGEST,
                                    mnonce=self.MNONCE)
        spelled = hmac.new(self.TIK, b"\x04\x01\x37\x15" + struct.pack("<I", 1) + self.DIGEST
                           + self.MNONCE, hashlib.sha256).digest()
        assert ours == spelled
        assert ours.hex() == self.MEASURE

    def test_the_secret_table_and_packet_are_pinned(self):
        """The table of one 32-byte secret, and its packet under fixed keys and IV."""
        table = build_secret_table({MIGRATION_SECRET_GUID: bytes(range(100, 132))})
        assert table.hex() == (
            "42f5741edd71664d963eef4287ff173b48000000fa7327287b7e2d409ef99874657f18d5"
            "34000000" + bytes(range(100, 132)).hex() + "00" * 8)
        measurement = Measurement(bytes.fromhex(self.MEASURE), self.MNONCE)
        with mock.patch("vmmig.platforms.emu.psp.owner.os.urandom", return_value=self.IV):
            header, ciphertext = build_secret_packet(self.TEK, self.TIK, measurement, table)
        assert header.hex() == ("00000000" + self.IV.hex() + "ab1ad413c40e976cafbf00d6381a8f9e"
                                "49e347d427076f6f05a8786ac06f3317")
        assert ciphertext.hex().startswith("aad032d198497e56a934cb7b86f8ea3b")
        assert parse_secret_table(table) == {MIGRATION_SECRET_GUID: bytes(range(100, 132))}

    def test_a_broken_table_is_refused(self):
        """A table whose entry length leaves it does not parse."""
        table = bytearray(build_secret_table({MIGRATION_SECRET_GUID: b"x" * 32}))
        table[36] = 0xFF
        with pytest.raises(ValueError, match="leaves the table"):
            parse_secret_table(bytes(table))


class TestGenuineLaunch:
    def test_the_secret_reaches_the_measured_guest(self, owner, psp):
        """Chain verified, session made, measurement matched: the PSP accepts the packet and
        the guest finds its master secret in the table."""
        offer = owner.start_launch("web-1", psp.chain)
        handle, memory, measurement = launch(psp, offer)
        header, ciphertext = owner.release_secret("web-1", offer.session,
                                                  measurement.to_bytes(), psp.firmware)
        psp.launch_secret(LaunchSecretRequest(handle, header, ciphertext, SECRET_GPA), memory)
        table = memory.read_private(SECRET_GPA, len(ciphertext))
        secret = parse_secret_table(table)[MIGRATION_SECRET_GUID]
        assert secret == owner.state.master_secret("web-1")
        assert len(secret) == 32

    def test_certificates_as_qemu_reports_them_are_completed_with_the_pinned_root(self, owner,
                                                                                   psp):
        """PDH and PEK||OCA||CEK alone (query-sev-capabilities) suffice."""
        offer = owner.start_launch("web-1", PlatformCerts(psp.chain.pdh, psp.chain.plat_certs))
        assert offer.policy == SEV.policy
        assert len(offer.session_blob) == 0x80

    def test_source_and_target_get_the_same_secret_across_owner_restarts(self, tmp_path, psp):
        """The master secret is made once, kept 0600 in a 0700 directory."""
        first = GuestOwner.open(tmp_path / "owner", trust())
        first.expect("web-1", SEV)
        secret = first.state.master_secret("web-1")
        again = GuestOwner.open(tmp_path / "owner")
        assert again.state.master_secret("web-1") == secret
        path = tmp_path / "owner" / "secrets" / "web-1.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "owner").stat().st_mode) == 0o700

    def test_the_root_is_pinned_once(self, tmp_path):
        """A state directory without a root needs one; another root is refused later."""
        with pytest.raises(ConfigError, match="trusts no AMD root yet"):
            GuestOwner.open(tmp_path / "empty")
        GuestOwner.open(tmp_path / "owner", trust())
        other = EmulatedAmdRoot.generate(key_bits=2048)
        with pytest.raises(ConfigError, match="already trusts another AMD root"):
            GuestOwner.open(tmp_path / "owner", TrustAnchor(other.ask_cert, other.ark_cert))

    def test_decisions_are_audited_without_secrets(self, owner, psp):
        """Each grant and refusal is one event and one audit.jsonl line; no secret in it."""
        offer = owner.start_launch("web-1", psp.chain)
        _, _, measurement = launch(psp, offer)
        owner.release_secret("web-1", offer.session, measurement.to_bytes(), psp.firmware)
        refused(Refusal.REPLAYED_SESSION, owner.release_secret, "web-1", offer.session,
                measurement.to_bytes(), psp.firmware)
        actions = [(e.action, e.granted, e.reason) for e in owner.audit.events]
        assert actions == [("expect", True, None), ("start-launch", True, None),
                           ("release-secret", True, None),
                           ("release-secret", False, Refusal.REPLAYED_SESSION)]
        text = (owner.state.directory / "audit.jsonl").read_text()
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["reason"] for line in lines][-1] == "replayed-session"
        assert owner.state.master_secret("web-1").hex() not in text


class TestRefusals:
    def test_a_different_launch_gets_no_secret(self, owner, psp):
        """Another image measures differently: refused, and the guest stays in LSECRET."""
        offer = owner.start_launch("web-1", psp.chain)
        handle, _, measurement = launch(psp, offer, image=[(0, page(9))])
        err = refused(Refusal.MEASUREMENT_MISMATCH, owner.release_secret, "web-1",
                      offer.session, measurement.to_bytes(), psp.firmware)
        assert "not the expected boot launch" in str(err)
        assert psp.guest_status(handle).state is GuestState.LSECRET

    def test_a_false_firmware_version_only_fails_the_comparison(self, owner, psp):
        """The MEASURE binds the version: a host claiming another one gets a mismatch."""
        offer = owner.start_launch("web-1", psp.chain)
        _, _, measurement = launch(psp, offer)
        claimed = attrs.evolve(psp.firmware, build=psp.firmware.build + 1)
        refused(Refusal.MEASUREMENT_MISMATCH, owner.release_secret, "web-1", offer.session,
                measurement.to_bytes(), claimed)

    def test_a_platform_of_another_amd_root_is_unknown(self, owner, tmp_path):
        """Its own chain leads to another ARK; completed with ours, its CEK is not endorsed."""
        foreign = Psp.load_or_create(tmp_path / "elsewhere", host_name="elsewhere",
                                     root=EmulatedAmdRoot.generate(key_bits=2048))
        err = refused(Refusal.UNKNOWN_PLATFORM, owner.start_launch, "web-1", foreign.chain)
        assert "another AMD root" in str(err)
        err = refused(Refusal.UNKNOWN_PLATFORM, owner.start_launch, "web-1",
                      PlatformCerts(foreign.chain.pdh, foreign.chain.plat_certs))
        assert "ASK -> CEK" in str(err)

    def test_a_tampered_pek_signature_is_a_bad_chain(self, owner, psp):
        """One flipped bit in the PEK's signature: refused, no session."""
        pek = bytearray(psp.chain.pek)
        pek[0x41C] ^= 1
        err = refused(Refusal.BAD_CHAIN, owner.start_launch, "web-1",
                      attrs.evolve(psp.chain, pek=bytes(pek)))
        assert "-> PEK" in str(err)
        assert not owner._pending

    @pytest.mark.parametrize(("launch_", "problem"), [
        (attrs.evolve(SEV, policy=Policy()), "lacks NODBG"),
        (attrs.evolve(SEV, tech="sev-es"), "lacks ES"),
        (attrs.evolve(SEV, policy=Policy(nodbg=True, es=True)), "sets ES"),
    ])
    def test_a_policy_the_owner_forbids_is_refused(self, owner, launch_, problem):
        """NODBG is required, ES must match the technology: refused when recorded."""
        err = refused(Refusal.POLICY_REFUSED, owner.expect, "web-2", launch_)
        assert problem in str(err)
        assert owner.state.expected("web-2") is None

    def test_a_forbidden_policy_on_disk_is_refused_at_launch(self, owner, psp):
        """An expectation edited behind the owner's back is checked again."""
        owner.state.expect("web-2", attrs.evolve(SEV, policy=Policy()))
        refused(Refusal.POLICY_REFUSED, owner.start_launch, "web-2", psp.chain)

    def test_firmware_older_than_required_is_refused(self, owner, psp):
        """The PEK states API 1.55; a guest requiring 2.0 gets no session there."""
        owner.expect("web-2", attrs.evolve(SEV, min_firmware=FirmwareVersion(2, 0)))
        err = refused(Refusal.POLICY_REFUSED, owner.start_launch, "web-2", psp.chain)
        assert "older than the required 2.0" in str(err)

    def test_an_unknown_guest_gets_no_session(self, owner, psp):
        """Without an expected launch there is nothing to attest against."""
        refused(Refusal.UNKNOWN_GUEST, owner.start_launch, "nobody", psp.chain)

    def test_a_session_serves_one_measurement(self, owner, psp):
        """Presented once, even wrongly, a session is spent: a retry is a replay."""
        offer = owner.start_launch("web-1", psp.chain)
        _, _, measurement = launch(psp, offer)
        refused(Refusal.MEASUREMENT_MISMATCH, owner.release_secret, "web-1", offer.session,
                bytes(48), psp.firmware)
        refused(Refusal.REPLAYED_SESSION, owner.release_secret, "web-1", offer.session,
                measurement.to_bytes(), psp.firmware)
        refused(Refusal.UNKNOWN_SESSION, owner.release_secret, "web-1", "00" * 16,
                measurement.to_bytes(), psp.firmware)

    def test_a_session_of_another_guest_is_unknown(self, owner, psp):
        """Guest B cannot take the secret with guest A's session."""
        owner.expect("web-2", SEV)
        offer = owner.start_launch("web-1", psp.chain)
        _, _, measurement = launch(psp, offer)
        refused(Refusal.UNKNOWN_SESSION, owner.release_secret, "web-2", offer.session,
                measurement.to_bytes(), psp.firmware)

    def test_a_measurement_from_another_platform_is_named(self, owner, psp):
        """A PDH other than the session's is an unknown platform."""
        offer = owner.start_launch("web-1", psp.chain)
        _, _, measurement = launch(psp, offer)
        refused(Refusal.UNKNOWN_PLATFORM, owner.release_secret, "web-1", offer.session,
                measurement.to_bytes(), psp.firmware, platform_pdh=b"other")

    def test_a_bad_guest_id_is_a_config_error(self, owner, psp):
        """Guest ids name files: no path separators."""
        with pytest.raises(ConfigError, match="not a guest id"):
            owner.start_launch("../x", psp.chain)


class TestLaunchKinds:
    """A migrating guest has two expected launches: its boot, and its migration target's."""

    @pytest.fixture
    def owner(self, owner):
        owner.expect("web-1", TARGET)
        return owner

    @pytest.mark.parametrize(("kind", "image"), [(LaunchKind.BOOT, IMAGE),
                                                 (LaunchKind.MIGRATION_TARGET, TARGET_IMAGE)],
                             ids=["boot", "migration-target"])
    def test_each_kind_of_session_is_measured_against_that_kinds_digest(self, owner, psp, kind,
                                                                        image):
        """Both launches of one guest get its one master secret; the audit names the kind."""
        offer = owner.start_launch("web-1", psp.chain, kind=kind)
        handle, memory, measurement = launch(psp, offer, image)
        header, ciphertext = owner.release_secret("web-1", offer.session,
                                                  measurement.to_bytes(), psp.firmware)
        psp.launch_secret(LaunchSecretRequest(handle, header, ciphertext, SECRET_GPA), memory)
        table = memory.read_private(SECRET_GPA, len(ciphertext))
        assert parse_secret_table(table)[MIGRATION_SECRET_GUID] == \
            owner.state.master_secret("web-1")
        started = [e for e in owner.audit.events if e.action == "start-launch"]
        assert started[-1].detail.startswith(f"{kind} pdh ")

    @pytest.mark.parametrize(("kind", "image"), [(LaunchKind.BOOT, TARGET_IMAGE),
                                                 (LaunchKind.MIGRATION_TARGET, IMAGE)],
                             ids=["target-image-on-boot-session", "boot-image-on-target-session"])
    def test_an_image_of_the_other_kind_is_refused(self, owner, psp, kind, image):
        """A target image on a boot session, or a boot image on a target session, mismatches."""
        offer = owner.start_launch("web-1", psp.chain, kind=kind)
        _, _, measurement = launch(psp, offer, image)
        err = refused(Refusal.MEASUREMENT_MISMATCH, owner.release_secret, "web-1",
                      offer.session, measurement.to_bytes(), psp.firmware)
        assert f"not the expected {kind} launch" in str(err)

    def test_a_target_launch_needs_a_target_expectation(self, owner, psp):
        """A guest expected to boot only gets no migration-target session; the refusal says so."""
        owner.expect("web-2", SEV)
        err = refused(Refusal.UNKNOWN_GUEST, owner.start_launch, "web-2", psp.chain,
                      kind=LaunchKind.MIGRATION_TARGET)
        assert "no expected migration-target launch" in str(err)

    def test_the_kinds_are_kept_apart_on_disk(self, owner):
        """guests/ holds the boot, targets/ the migration target's launch."""
        assert owner.state.expected("web-1") == SEV
        assert owner.state.expected("web-1", LaunchKind.MIGRATION_TARGET) == TARGET
        assert (owner.state.directory / "targets" / "web-1.json").exists()

    def test_a_state_file_without_a_kind_is_a_boot(self, owner):
        """Files written before launch kinds existed still load, as boot expectations."""
        old = SEV.to_json()
        del old["kind"]
        write_state(owner.state.directory / "guests" / "web-2.json", old)
        assert owner.state.expected("web-2") == SEV

    def test_an_expectation_filed_under_the_other_kind_is_corrupt(self, owner):
        """A boot expectation copied into targets/ must not pass for the target's."""
        write_state(owner.state.directory / "targets" / "web-2.json", SEV.to_json())
        with pytest.raises(PlatformError, match="a boot launch where a migration-target one"):
            owner.state.expected("web-2", LaunchKind.MIGRATION_TARGET)
