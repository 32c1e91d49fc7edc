"""SEND_* / RECEIVE_*: the PSP migration path between two emulated hosts."""

from __future__ import annotations

import attrs
import pytest
from psp_support import FakeGuestMemory, launch, make_psp, owner_session, page

from vmmig.platforms.emu.psp import (
    EmulatedAmdRoot,
    FirmwareVersion,
    GuestState,
    Policy,
    Psp,
    PspError,
    PspStatus,
    ReceiveStartRequest,
    ReceiveUpdateDataRequest,
    ReceiveUpdateVmsaRequest,
    SendStartRequest,
    SendUpdateDataRequest,
    SendUpdateVmsaRequest,
    SevCommand,
)


PAGES = {0x0000: page(1), 0x3000: page(2), 0x7000: page(3)}
VMSA = bytes(range(255, -1, -1)) * 16


def _refused(status, call):
    with pytest.raises(PspError) as info:
        call()
    assert info.value.status is status, str(info.value)
    return info.value


def _running(psp, memory, policy, vmsas=()):
    launched = launch(psp, memory, policy, sorted(PAGES.items()), vmsas)
    psp.launch_finish(launched.handle)
    return launched.handle


def _send_start(source, handle, target):
    chain = target.chain
    return source.send_start(SendStartRequest(handle, chain.pdh, chain.plat_certs, chain.amd_certs))


@attrs.define
class Migration:
    source: Psp
    target: Psp
    source_memory: FakeGuestMemory
    target_memory: FakeGuestMemory
    source_handle: int
    target_handle: int


def _start_migration(tmp_path, policy=None, vmsas=()):
    policy = policy if policy is not None else Policy()
    source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
    source_memory, target_memory = FakeGuestMemory(), FakeGuestMemory()
    handle = _running(source, source_memory, policy, vmsas)
    started = _send_start(source, handle, target)
    target_handle = target.receive_start(
        ReceiveStartRequest(started.policy, started.dh_cert, started.session)
    )
    return Migration(source, target, source_memory, target_memory, handle, target_handle)


def _export(m, gpa):
    return m.source.send_update_data(
        SendUpdateDataRequest(m.source_handle, gpa, 4096), m.source_memory
    )


def _import(m, gpa, packet):
    m.target.receive_update_data(
        ReceiveUpdateDataRequest(m.target_handle, packet.header, packet.ciphertext, gpa),
        m.target_memory,
    )


class TestSendReceive:
    def test_pages_round_trip_between_two_hosts(self, tmp_path):
        """Pages exported by host A's PSP import on host B's to the same plaintext."""
        m = _start_migration(tmp_path)
        for gpa in PAGES:
            _import(m, gpa, _export(m, gpa))
        m.source.send_finish(m.source_handle)
        m.target.receive_finish(m.target_handle)
        for gpa, data in PAGES.items():
            assert m.target_memory.read_private(gpa, 4096) == data
        assert m.target.guest_status(m.target_handle).state is GuestState.RUNNING
        assert m.source.guest_status(m.source_handle).state is GuestState.SENT

    def test_the_transport_carries_no_plaintext(self, tmp_path):
        """A transport packet contains no 16-byte run of the page it carries."""
        m = _start_migration(tmp_path)
        packet = _export(m, 0x3000)
        data = PAGES[0x3000]
        assert len(packet.ciphertext) == 4096
        assert not any(data[i : i + 16] in packet.ciphertext for i in range(0, 4096, 16))

    def test_the_same_page_exports_under_a_fresh_iv(self, tmp_path):
        """Exporting one page twice gives different IVs and ciphertexts."""
        m = _start_migration(tmp_path)
        first, second = _export(m, 0), _export(m, 0)
        assert first.header[4:20] != second.header[4:20]
        assert first.ciphertext != second.ciphertext

    def test_the_target_gets_its_own_vek(self, tmp_path):
        """The received guest is encrypted under a new VEK, not the source's."""
        m = _start_migration(tmp_path)
        slots = FakeGuestMemory(), FakeGuestMemory()
        m.source.activate(m.source_handle, slots[0])
        m.target.activate(m.target_handle, slots[1])
        assert slots[0].vek != slots[1].vek

    def test_the_policy_travels_with_the_guest(self, tmp_path):
        """The target guest has the source guest's policy."""
        policy = Policy(nodbg=True, noks=True, api_major=1, api_minor=40)
        m = _start_migration(tmp_path, policy)
        assert m.target.guest_status(m.target_handle).policy == policy


class TestIntegrity:
    @pytest.mark.parametrize(
        ("part", "offset"), [("ciphertext", 100), ("header", 4), ("header", 0x33)]
    )
    def test_a_tampered_packet_fails_the_mac_and_writes_nothing(self, tmp_path, part, offset):
        """One flipped bit in the ciphertext, IV or MAC is BAD_MEASUREMENT; memory is untouched."""
        m = _start_migration(tmp_path)
        packet = _export(m, 0x3000)
        data = bytearray(getattr(packet, part))
        data[offset] ^= 0x01
        tampered = attrs.evolve(packet, **{part: bytes(data)})
        error = _refused(PspStatus.BAD_MEASUREMENT, lambda: _import(m, 0x3000, tampered))
        assert error.command is SevCommand.RECEIVE_UPDATE_DATA
        assert m.target_memory.writes == 0
        assert m.target.guest_status(m.target_handle).state is GuestState.RUPDATE

    def test_a_packet_of_another_migration_is_refused(self, tmp_path):
        """A page sealed for one session does not verify in another."""
        m = _start_migration(tmp_path)
        other = _start_migration(tmp_path / "other")
        _refused(PspStatus.BAD_MEASUREMENT, lambda: _import(m, 0, _export(other, 0)))

    def test_a_policy_changed_in_transit_is_refused(self, tmp_path):
        """RECEIVE_START with another policy than SEND_START reported fails POLICY_MAC."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        handle = _running(source, FakeGuestMemory(), Policy(nodbg=True))
        started = _send_start(source, handle, target)
        request = ReceiveStartRequest(Policy(), started.dh_cert, started.session)
        _refused(PspStatus.BAD_MEASUREMENT, lambda: target.receive_start(request))
        assert target.platform_status().guest_count == 0

    def test_a_session_for_another_target_is_refused(self, tmp_path):
        """Host C cannot open a session SEND_START wrapped to host B."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        thief = make_psp(tmp_path, "host-c")
        started = _send_start(source, _running(source, FakeGuestMemory(), Policy()), target)
        request = ReceiveStartRequest(started.policy, started.dh_cert, started.session)
        _refused(PspStatus.BAD_MEASUREMENT, lambda: thief.receive_start(request))


class TestSendPolicy:
    def test_nosend_refuses_send_start(self, tmp_path):
        """SEND_START for a NOSEND guest is POLICY_FAILURE; the guest keeps RUNNING."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        handle = _running(source, FakeGuestMemory(), Policy(nosend=True))
        error = _refused(PspStatus.POLICY_FAILURE, lambda: _send_start(source, handle, target))
        assert "NOSEND" in str(error)
        assert source.guest_status(handle).state is GuestState.RUNNING

    def test_domain_refuses_a_target_with_another_owner(self, tmp_path):
        """Under DOMAIN, a target whose OCA differs (every other host here) is refused."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        handle = _running(source, FakeGuestMemory(), Policy(domain=True))
        _refused(PspStatus.POLICY_FAILURE, lambda: _send_start(source, handle, target))

    def test_a_target_with_older_firmware_is_refused_at_the_source(self, tmp_path):
        """SEND_START refuses a target whose PEK states an API older than the policy minimum."""
        source = make_psp(tmp_path, "host-a")
        target = make_psp(tmp_path, "host-b", firmware=FirmwareVersion(1, 50, 1))
        handle = _running(source, FakeGuestMemory(), Policy(api_major=1, api_minor=55))
        error = _refused(PspStatus.POLICY_FAILURE, lambda: _send_start(source, handle, target))
        assert "1.50" in str(error)

    def test_older_firmware_refuses_receive_start(self, tmp_path):
        """RECEIVE_START on firmware older than the policy minimum is POLICY_FAILURE."""
        target = make_psp(tmp_path, "host-b", firmware=FirmwareVersion(1, 50, 1))
        policy = Policy(api_major=1, api_minor=55)
        owner = owner_session(target, policy)
        request = ReceiveStartRequest(policy, owner.dh_cert, owner.session)
        _refused(PspStatus.POLICY_FAILURE, lambda: target.receive_start(request))


class TestTargetChain:
    def test_a_target_under_another_amd_root_is_refused(self, tmp_path):
        """SEND_START validates the target up to the ARK the source trusts."""
        source = make_psp(tmp_path, "host-a")
        foreign_root = EmulatedAmdRoot.generate(key_bits=2048)  # 2048: speed only
        target = Psp.load_or_create(tmp_path / "x", host_name="x", root=foreign_root)
        handle = _running(source, FakeGuestMemory(), Policy())
        error = _refused(PspStatus.INVALID_CERTIFICATE, lambda: _send_start(source, handle, target))
        assert "ARK" in str(error)
        assert source.guest_status(handle).state is GuestState.RUNNING

    def test_an_impostor_pdh_is_refused(self, tmp_path):
        """A PDH not signed by the target's PEK (e.g. the attacker's) is BAD_SIGNATURE."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        impostor = make_psp(tmp_path, "host-c").chain.pdh
        handle = _running(source, FakeGuestMemory(), Policy())
        chain = target.chain
        request = SendStartRequest(handle, impostor, chain.plat_certs, chain.amd_certs)
        error = _refused(PspStatus.BAD_SIGNATURE, lambda: source.send_start(request))
        assert "PEK -> PDH" in str(error)


class TestSendOrder:
    def test_cancel_returns_to_running_and_a_new_send_can_start(self, tmp_path):
        """SEND_CANCEL before SEND_FINISH makes the guest RUNNING; SEND_START works again."""
        m = _start_migration(tmp_path)
        m.source.send_cancel(m.source_handle)
        status = m.source.guest_status(m.source_handle)
        assert status.state is GuestState.RUNNING
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: _export(m, 0))
        _send_start(m.source, m.source_handle, m.target)
        assert m.source.guest_status(m.source_handle).state is GuestState.SUPDATE

    def test_a_sent_guest_never_runs_or_sends_again(self, tmp_path):
        """After SEND_FINISH the guest is SENT: not runnable, no cancel, no export, no key."""
        m = _start_migration(tmp_path)
        m.source.send_finish(m.source_handle)
        state = m.source.guest_status(m.source_handle).state
        assert state is GuestState.SENT
        assert not state.runnable
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: m.source.send_cancel(m.source_handle))
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: _export(m, 0))
        _refused(
            PspStatus.INVALID_GUEST_STATE,
            lambda: m.source.activate(m.source_handle, FakeGuestMemory()),
        )

    def test_a_guest_being_sent_still_runs(self, tmp_path):
        """During SUPDATE the source guest keeps running (live migration)."""
        m = _start_migration(tmp_path)
        assert m.source.guest_status(m.source_handle).state.runnable

    def test_a_launching_guest_cannot_be_sent(self, tmp_path):
        """SEND_START before LAUNCH_FINISH is INVALID_GUEST_STATE."""
        source, target = make_psp(tmp_path, "host-a"), make_psp(tmp_path, "host-b")
        launched = launch(source, FakeGuestMemory(), Policy(), sorted(PAGES.items()))
        _refused(
            PspStatus.INVALID_GUEST_STATE, lambda: _send_start(source, launched.handle, target)
        )

    def test_the_target_refuses_commands_after_finish(self, tmp_path):
        """RECEIVE_UPDATE_DATA after RECEIVE_FINISH is refused and writes nothing."""
        m = _start_migration(tmp_path)
        packet = _export(m, 0)
        m.target.receive_finish(m.target_handle)
        _refused(PspStatus.INVALID_GUEST_STATE, lambda: _import(m, 0, packet))
        assert m.target_memory.writes == 0


class TestSevEsMigration:
    def test_vmsas_round_trip(self, tmp_path):
        """An ES guest's VMSA exported on A is sealed on B; the target then finishes."""
        m = _start_migration(tmp_path, Policy(es=True), vmsas=[VMSA])
        packet = m.source.send_update_vmsa(
            SendUpdateVmsaRequest(m.source_handle, 0), m.source_memory
        )
        assert VMSA[:64] not in packet.ciphertext
        m.target.receive_update_vmsa(
            ReceiveUpdateVmsaRequest(m.target_handle, 0, packet.header, packet.ciphertext),
            m.target_memory,
        )
        m.target.receive_finish(m.target_handle)
        assert m.target_memory.vmsas == {0: VMSA}

    def test_a_vmsa_packet_does_not_import_as_a_page(self, tmp_path):
        """VMSA and data packets are MACed apart: a VMSA packet fails RECEIVE_UPDATE_DATA."""
        m = _start_migration(tmp_path, Policy(es=True), vmsas=[VMSA])
        packet = m.source.send_update_vmsa(
            SendUpdateVmsaRequest(m.source_handle, 0), m.source_memory
        )
        _refused(PspStatus.BAD_MEASUREMENT, lambda: _import(m, 0, packet))

    def test_an_es_guest_cannot_finish_without_its_vmsa(self, tmp_path):
        """RECEIVE_FINISH of an ES guest with no VMSA received is refused; it stays RUPDATE."""
        m = _start_migration(tmp_path, Policy(es=True), vmsas=[VMSA])
        _refused(PspStatus.POLICY_FAILURE, lambda: m.target.receive_finish(m.target_handle))
        assert m.target.guest_status(m.target_handle).state is GuestState.RUPDATE

    def test_vmsa_export_needs_policy_es(self, tmp_path):
        """SEND_UPDATE_VMSA for a non-ES guest is POLICY_FAILURE."""
        m = _start_migration(tmp_path)
        request = SendUpdateVmsaRequest(m.source_handle, 0)
        _refused(
            PspStatus.POLICY_FAILURE, lambda: m.source.send_update_vmsa(request, m.source_memory)
        )
