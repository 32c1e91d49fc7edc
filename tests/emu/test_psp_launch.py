"""The emulated PSP's launch commands, driven by the guest owner's helpers."""

from __future__ import annotations

import pytest
from psp_support import FakeGuestMemory, launch, make_psp, owner_session, page, start

from vmmig.platforms.emu.psp import (
    DEFAULT_FIRMWARE,
    GuestState,
    LaunchSecretRequest,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    Policy,
    PspError,
    PspStatus,
    SevCommand,
    build_secret_packet,
    expected_measurement,
    launch_digest,
)


IMAGE = [(0x0000, page(1)), (0x1000, page(2)), (0x8000, b"firmware tail!!!" * 4)]
SECRET_GPA = 0x4000
SECRET = b"the migration master secret 0123" * 2


def _expected(launched, policy, chunks):
    return expected_measurement(
        tik=launched.owner.tik,
        firmware=DEFAULT_FIRMWARE,
        policy=policy,
        launch_digest=launch_digest(chunks),
        mnonce=launched.measurement.mnonce,
    )


def _refused(status, call):
    with pytest.raises(PspError) as info:
        call()
    assert info.value.status is status, str(info.value)
    return info.value


class TestLaunchFlow:
    def test_measurement_matches_the_owners_expectation(self, tmp_path):
        """The owner recomputes the PSP's MEASURE from the image, policy, firmware and MNONCE."""
        policy = Policy(nodbg=True, noks=True)
        launched = launch(make_psp(tmp_path), FakeGuestMemory(), policy, IMAGE)
        assert launched.measurement.measure == _expected(launched, policy, [d for _, d in IMAGE])

    def test_measurement_covers_every_byte_of_the_image(self, tmp_path):
        """An image differing in one byte does not give the expected measurement."""
        policy = Policy()
        tampered = [*IMAGE[:-1], (0x8000, b"firmware tail!!?" + IMAGE[-1][1][16:])]
        launched = launch(make_psp(tmp_path), FakeGuestMemory(), policy, tampered)
        assert launched.measurement.measure != _expected(launched, policy, [d for _, d in IMAGE])

    def test_measurement_binds_the_policy(self, tmp_path):
        """The expected measurement under another policy does not match."""
        launched = launch(make_psp(tmp_path), FakeGuestMemory(), Policy(nodbg=True), IMAGE)
        assert launched.measurement.measure != _expected(launched, Policy(), [d for _, d in IMAGE])

    def test_launch_data_lands_in_private_memory(self, tmp_path):
        """LAUNCH_UPDATE_DATA writes each chunk at its gpa through the machine's writer."""
        memory = FakeGuestMemory()
        launch(make_psp(tmp_path), memory, Policy(), IMAGE)
        for gpa, data in IMAGE:
            assert memory.read_private(gpa, len(data)) == data

    def test_secret_lands_at_its_gpa_and_the_guest_runs(self, tmp_path):
        """A genuine secret is decrypted into memory; LAUNCH_FINISH makes the guest RUNNING."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        launched = launch(psp, memory, Policy(), IMAGE)
        packet = build_secret_packet(
            launched.owner.tek, launched.owner.tik, launched.measurement, SECRET
        )
        assert SECRET not in packet.ciphertext
        psp.launch_secret(
            LaunchSecretRequest(launched.handle, packet.header, packet.ciphertext, SECRET_GPA),
            memory,
        )
        assert memory.read_private(SECRET_GPA, len(SECRET)) == SECRET
        psp.launch_finish(launched.handle)
        status = psp.guest_status(launched.handle)
        assert status.state is GuestState.RUNNING
        assert status.state.runnable

    def test_measurement_blob_is_measure_then_mnonce(self, tmp_path):
        """The 48-byte blob (query-sev-launch-measure) is MEASURE || MNONCE."""
        launched = launch(make_psp(tmp_path), FakeGuestMemory(), Policy(), IMAGE)
        blob = launched.measurement.to_bytes()
        assert len(blob) == 48
        assert blob[:32] == launched.measurement.measure
        assert blob[32:] == launched.measurement.mnonce

    def test_each_measure_has_a_fresh_mnonce(self, tmp_path):
        """Two launches of the same image get different MNONCEs and so different MEASUREs."""
        psp = make_psp(tmp_path)
        first = launch(psp, FakeGuestMemory(), Policy(), IMAGE).measurement
        second = launch(psp, FakeGuestMemory(), Policy(), IMAGE).measurement
        assert first.mnonce != second.mnonce
        assert first.measure != second.measure


class TestLaunchSecret:
    def _launched(self, tmp_path):
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        launched = launch(psp, memory, Policy(), IMAGE)
        return psp, memory, launched

    def _inject(self, psp, memory, launched, header, ciphertext):
        before = bytes(memory.private)
        request = LaunchSecretRequest(launched.handle, header, ciphertext, SECRET_GPA)
        error = _refused(PspStatus.BAD_MEASUREMENT, lambda: psp.launch_secret(request, memory))
        assert bytes(memory.private) == before
        assert psp.guest_status(launched.handle).state is GuestState.LSECRET
        return error

    def test_a_bad_mac_is_refused_and_nothing_is_written(self, tmp_path):
        """A header whose MAC is off by one bit is BAD_MEASUREMENT; memory is untouched."""
        psp, memory, launched = self._launched(tmp_path)
        header, ciphertext = build_secret_packet(
            launched.owner.tek, launched.owner.tik, launched.measurement, SECRET
        )
        bad = header[:-1] + bytes([header[-1] ^ 1])
        error = self._inject(psp, memory, launched, bad, ciphertext)
        assert error.command is SevCommand.LAUNCH_SECRET
        assert "LAUNCH_SECRET" in str(error)

    def test_tampered_ciphertext_is_refused(self, tmp_path):
        """Changing the ciphertext breaks the MAC."""
        psp, memory, launched = self._launched(tmp_path)
        header, ciphertext = build_secret_packet(
            launched.owner.tek, launched.owner.tik, launched.measurement, SECRET
        )
        self._inject(psp, memory, launched, header, bytes([ciphertext[0] ^ 0x80]) + ciphertext[1:])

    def test_a_secret_for_another_measurement_is_refused(self, tmp_path):
        """A packet bound to another launch's MEASURE does not verify."""
        psp, memory, launched = self._launched(tmp_path)
        other = bytes(32)
        header, ciphertext = build_secret_packet(
            launched.owner.tek, launched.owner.tik, other, SECRET
        )
        self._inject(psp, memory, launched, header, ciphertext)

    def test_compressed_packets_are_unsupported(self, tmp_path):
        """FLAGS other than 0 (compression) are refused before anything is written."""
        psp, memory, launched = self._launched(tmp_path)
        header, ciphertext = build_secret_packet(
            launched.owner.tek, launched.owner.tik, launched.measurement, SECRET, flags=1
        )
        request = LaunchSecretRequest(launched.handle, header, ciphertext, SECRET_GPA)
        _refused(PspStatus.UNSUPPORTED, lambda: psp.launch_secret(request, memory))
        assert not any(memory.read_private(SECRET_GPA, len(SECRET)))


class TestLaunchStart:
    def test_a_policy_changed_after_the_owner_is_refused(self, tmp_path):
        """A policy other than the one the owner MACed fails POLICY_MAC; no guest exists."""
        psp = make_psp(tmp_path)
        owner = owner_session(psp, Policy(nodbg=True, nosend=True))
        request = LaunchStartRequest(Policy(nodbg=True), owner.dh_cert, owner.session)
        error = _refused(PspStatus.BAD_MEASUREMENT, lambda: psp.launch_start(request))
        assert "POLICY_MAC" in str(error)
        assert psp.platform_status().guest_count == 0

    def test_a_session_for_another_platform_is_refused(self, tmp_path):
        """A session wrapped to host B's PDH does not open on host A (WRAP_MAC)."""
        psp_a, psp_b = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        owner = owner_session(psp_b, Policy())
        request = LaunchStartRequest(Policy(), owner.dh_cert, owner.session)
        error = _refused(PspStatus.BAD_MEASUREMENT, lambda: psp_a.launch_start(request))
        assert "WRAP_MAC" in str(error)

    def test_a_malformed_dh_certificate_is_refused(self, tmp_path):
        """A DH certificate with a bad version field is INVALID_CERTIFICATE."""
        psp = make_psp(tmp_path)
        owner = owner_session(psp, Policy())
        request = LaunchStartRequest(Policy(), b"\x02" + owner.dh_cert[1:], owner.session)
        _refused(PspStatus.INVALID_CERTIFICATE, lambda: psp.launch_start(request))

    def test_a_signing_key_is_not_accepted_as_dh_key(self, tmp_path):
        """The platform's own PEK certificate in place of the owner's DH key is refused."""
        psp = make_psp(tmp_path)
        owner = owner_session(psp, Policy())
        request = LaunchStartRequest(Policy(), psp.chain.pek, owner.session)
        _refused(PspStatus.INVALID_CERTIFICATE, lambda: psp.launch_start(request))

    def test_a_short_session_is_refused(self, tmp_path):
        """A session buffer that is not 0x80 bytes is INVALID_LENGTH."""
        psp = make_psp(tmp_path)
        owner = owner_session(psp, Policy())
        request = LaunchStartRequest(Policy(), owner.dh_cert, owner.session[:-1])
        _refused(PspStatus.INVALID_LENGTH, lambda: psp.launch_start(request))


class TestApiVersionPolicy:
    @pytest.mark.parametrize(("major", "minor"), [(1, 56), (2, 0)])
    def test_a_newer_minimum_than_the_firmware_is_refused(self, tmp_path, major, minor):
        """LAUNCH_START is refused when the policy asks for newer firmware than 1.55."""
        psp = make_psp(tmp_path)
        policy = Policy(api_major=major, api_minor=minor)
        owner = owner_session(psp, policy)
        request = LaunchStartRequest(policy, owner.dh_cert, owner.session)
        error = _refused(PspStatus.POLICY_FAILURE, lambda: psp.launch_start(request))
        assert f"{major}.{minor}" in str(error)

    @pytest.mark.parametrize(("major", "minor"), [(1, 55), (1, 0), (0, 99)])
    def test_the_firmware_version_or_older_is_accepted(self, tmp_path, major, minor):
        """Minimums up to 1.55 (major compared first) are met by firmware 1.55."""
        psp = make_psp(tmp_path)
        handle, _ = start(psp, Policy(api_major=major, api_minor=minor))
        assert psp.guest_status(handle).state is GuestState.LUPDATE


class TestCommandOrder:
    def test_commands_before_measure_are_refused_and_change_nothing(self, tmp_path):
        """LAUNCH_SECRET and LAUNCH_FINISH in LUPDATE are refused; the launch goes on intact."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        policy = Policy()
        handle, owner = start(psp, policy)
        psp.launch_update_data(LaunchUpdateDataRequest(handle, 0, IMAGE[0][1]), memory)
        secret = LaunchSecretRequest(handle, bytes(0x34), bytes(16), SECRET_GPA)
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_secret(secret, memory))
        error = _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_finish(handle))
        assert "LUPDATE" in str(error)
        assert psp.guest_status(handle).state is GuestState.LUPDATE
        measurement = psp.launch_measure(handle)
        expected = expected_measurement(
            tik=owner.tik,
            firmware=DEFAULT_FIRMWARE,
            policy=policy,
            launch_digest=launch_digest([IMAGE[0][1]]),
            mnonce=measurement.mnonce,
        )
        assert measurement.measure == expected

    def test_data_after_measure_is_refused_and_not_written(self, tmp_path):
        """LAUNCH_UPDATE_DATA in LSECRET is refused and leaves memory alone."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        launched = launch(psp, memory, Policy(), IMAGE)
        request = LaunchUpdateDataRequest(launched.handle, 0x9000, page(9))
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_update_data(request, memory))
        assert not any(memory.read_private(0x9000, 4096))
        assert psp.guest_status(launched.handle).state is GuestState.LSECRET

    def test_measuring_twice_is_refused(self, tmp_path):
        """A second LAUNCH_MEASURE is INVALID_GUEST_STATE."""
        psp = make_psp(tmp_path)
        launched = launch(psp, FakeGuestMemory(), Policy(), IMAGE)
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_measure(launched.handle))

    def test_a_running_guest_takes_no_more_launch_commands(self, tmp_path):
        """After LAUNCH_FINISH, LAUNCH_FINISH and LAUNCH_MEASURE are refused."""
        psp = make_psp(tmp_path)
        launched = launch(psp, FakeGuestMemory(), Policy(), IMAGE)
        psp.launch_finish(launched.handle)
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_finish(launched.handle))
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: psp.launch_measure(launched.handle))
        assert psp.guest_status(launched.handle).state is GuestState.RUNNING

    def test_an_unknown_handle_is_invalid_guest(self, tmp_path):
        """Commands on a handle the PSP never issued fail with INVALID_GUEST."""
        _refused(PspStatus.INVALID_GUEST, lambda: make_psp(tmp_path).launch_measure(42))


class TestAlignment:
    @pytest.mark.parametrize(
        ("gpa", "data", "status"),
        [
            (0x1008, bytes(16), PspStatus.INVALID_ADDRESS),
            (0x1000, bytes(15), PspStatus.INVALID_LENGTH),
            (0x1000, b"", PspStatus.INVALID_LENGTH),
        ],
    )
    def test_unaligned_launch_data_is_refused_unmeasured(self, tmp_path, gpa, data, status):
        """Unaligned data is refused, not written, and not part of the measurement."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        policy = Policy()
        handle, owner = start(psp, policy)
        request = LaunchUpdateDataRequest(handle, gpa, data)
        _refused(status, lambda: psp.launch_update_data(request, memory))
        assert memory.writes == 0
        measurement = psp.launch_measure(handle)
        assert measurement.measure == expected_measurement(
            tik=owner.tik,
            firmware=DEFAULT_FIRMWARE,
            policy=policy,
            launch_digest=launch_digest([]),
            mnonce=measurement.mnonce,
        )


class TestSevEs:
    VMSA = bytes(range(256)) * 16

    def test_vmsa_commands_need_policy_es(self, tmp_path):
        """LAUNCH_UPDATE_VMSA for a non-ES guest is POLICY_FAILURE."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        handle, _ = start(psp, Policy())
        request = LaunchUpdateVmsaRequest(handle, 0, self.VMSA)
        _refused(PspStatus.POLICY_FAILURE, lambda: psp.launch_update_vmsa(request, memory))
        assert memory.vmsas == {}

    def test_an_es_guest_cannot_be_measured_without_a_vmsa(self, tmp_path):
        """LAUNCH_MEASURE of an ES guest with no measured VMSA is refused; it stays in LUPDATE."""
        psp = make_psp(tmp_path)
        handle, _ = start(psp, Policy(es=True))
        _refused(PspStatus.POLICY_FAILURE, lambda: psp.launch_measure(handle))
        assert psp.guest_status(handle).state is GuestState.LUPDATE

    def test_vmsas_are_sealed_and_measured_after_the_image(self, tmp_path):
        """The measurement covers the image then each VMSA; the VMSA goes to the machine."""
        policy = Policy(es=True, nodbg=True)
        memory = FakeGuestMemory()
        launched = launch(make_psp(tmp_path), memory, policy, IMAGE, vmsas=[self.VMSA])
        chunks = [d for _, d in IMAGE] + [self.VMSA]
        assert launched.measurement.measure == _expected(launched, policy, chunks)
        assert memory.vmsas == {0: self.VMSA}

    def test_a_vcpu_is_measured_once(self, tmp_path):
        """A second VMSA for the same vCPU is INVALID_PARAM."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        handle, _ = start(psp, Policy(es=True))
        psp.launch_update_vmsa(LaunchUpdateVmsaRequest(handle, 0, self.VMSA), memory)
        again = LaunchUpdateVmsaRequest(handle, 0, self.VMSA)
        _refused(PspStatus.INVALID_PARAM, lambda: psp.launch_update_vmsa(again, memory))

    def test_a_vmsa_is_one_page(self, tmp_path):
        """A VMSA that is not 4096 bytes is INVALID_LENGTH."""
        psp, memory = make_psp(tmp_path), FakeGuestMemory()
        handle, _ = start(psp, Policy(es=True))
        request = LaunchUpdateVmsaRequest(handle, 0, self.VMSA[:-16])
        _refused(PspStatus.INVALID_LENGTH, lambda: psp.launch_update_vmsa(request, memory))


class TestKeys:
    def test_activate_loads_a_fresh_32_byte_vek_per_guest(self, tmp_path):
        """Each launch gets its own 32-byte VEK, delivered only into the key slot."""
        psp = make_psp(tmp_path)
        slots = [FakeGuestMemory(), FakeGuestMemory()]
        for slot in slots:
            handle, _ = start(psp, Policy(noks=True))
            psp.activate(handle, slot)
        assert len(slots[0].vek) == 32
        assert slots[0].vek != slots[1].vek

    def test_key_sharing_gives_the_same_vek(self, tmp_path):
        """LAUNCH_START with share_handle reuses that guest's VEK when no policy says NOKS."""
        psp = make_psp(tmp_path)
        first, _ = start(psp, Policy())
        owner = owner_session(psp, Policy())
        second = psp.launch_start(
            LaunchStartRequest(Policy(), owner.dh_cert, owner.session, share_handle=first)
        )
        slots = [FakeGuestMemory(), FakeGuestMemory()]
        psp.activate(first, slots[0])
        psp.activate(second, slots[1])
        assert slots[0].vek == slots[1].vek

    @pytest.mark.parametrize(("existing", "new"), [(True, False), (False, True)])
    def test_noks_forbids_key_sharing(self, tmp_path, existing, new):
        """Sharing is POLICY_FAILURE if either guest's policy has NOKS; no guest is added."""
        psp = make_psp(tmp_path)
        first, _ = start(psp, Policy(noks=existing))
        owner = owner_session(psp, Policy(noks=new))
        request = LaunchStartRequest(
            Policy(noks=new), owner.dh_cert, owner.session, share_handle=first
        )
        _refused(PspStatus.POLICY_FAILURE, lambda: psp.launch_start(request))
        assert psp.platform_status().guest_count == 1

    def test_decommission_forgets_the_guest(self, tmp_path):
        """After DECOMMISSION the handle is INVALID_GUEST."""
        psp = make_psp(tmp_path)
        handle, _ = start(psp, Policy())
        psp.decommission(handle)
        _refused(PspStatus.INVALID_GUEST, lambda: psp.guest_status(handle))
        assert psp.platform_status().guest_count == 0
