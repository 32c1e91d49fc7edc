"""The MH end to end: a full migration over 16 MiB, and each attack of a hostile host."""

from __future__ import annotations

import numpy as np
import pytest
from mh_support import SECRET, Host, batches, guest_memory, open_session, pair

from vmmig.firmware.abi import (
    PAGE_SIZE,
    Command,
    HelloReply,
    HelloRequest,
    OpenSessionRequest,
    Role,
    Status,
    pack_export_request,
)
from vmmig.firmware.envelope import RECORD_HEADER_SIZE, TAG_SIZE
from vmmig.firmware.handler import MigrationHandler
from vmmig.firmware.manifest import MismatchBits
from vmmig.firmware.states import MhState


PAGES_16M = (16 << 20) // PAGE_SIZE


def refuses_commit(target: Host) -> None:
    """The target can no longer verify or commit this session."""
    assert target.mh.state is MhState.FAILED
    assert target.call(Command.MANIFEST, b"").status is Status.BAD_STATE
    assert target.call(Command.COMMIT).status is Status.BAD_STATE


def finish(source: Host, target: Host) -> None:
    """Manifest, verification, commit and the receipt back to the source."""
    sealed = source.ok(Command.MANIFEST)
    target.ok(Command.MANIFEST, sealed)
    receipt = target.ok(Command.COMMIT)
    source.ok(Command.COMMIT, receipt)
    assert target.mh.state is MhState.TARGET_COMMITTED
    assert source.mh.state is MhState.SOURCE_RETIRED


class TestFullMigration:
    def test_16_mib_with_zero_pages_and_a_dirty_round(self):
        """Two rounds (all RAM, then the dirtied pages); memory equal, manifest ok, commit."""
        memory = guest_memory(PAGES_16M, seed=1)
        source, target = pair(memory)
        for gpas in batches(PAGES_16M, 512):
            assert target.import_status(source.export(gpas)) is Status.OK
        # The guest keeps running: it dirties pages, some to zero; the host re-sends them.
        rng = np.random.default_rng(2)
        dirty = np.sort(rng.choice(PAGES_16M, 700, replace=False))
        memory[dirty[:350]] = rng.integers(0, 256, (350, PAGE_SIZE), dtype=np.uint8)
        memory[dirty[350:]] = 0
        for start in range(0, len(dirty), 256):
            gpas = dirty[start : start + 256].astype(np.uint64) * PAGE_SIZE
            assert target.import_status(source.export(gpas)) is Status.OK
        finish(source, target)
        assert np.array_equal(target.mh.memory, memory)

    def test_hello_reports_role_state_and_limits(self):
        """HELLO tells the host the ABI, the batch limit, the state and RAM size."""
        source, _ = pair(guest_memory(16))
        reply = HelloReply.unpack(source.ok(Command.HELLO, HelloRequest(1).pack()))
        assert (reply.abi_version, reply.max_batch_pages, reply.ram_pages) == (1, 512, 16)
        assert reply.role is Role.SOURCE
        assert reply.state == MhState.SOURCE_OPEN

    def test_target_nonce_first(self):
        """The target may draw its nonce first; the source then opens in one step."""
        memory = guest_memory(8)
        source = Host(MigrationHandler(memory, SECRET))
        target = Host(MigrationHandler(np.zeros_like(memory), SECRET))
        first = target.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET).pack())
        src = source.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE, first[:32]).pack())
        tgt = target.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET, src[:32]).pack())
        assert src[32:] == tgt[32:]
        assert (
            target.import_status(source.export(np.arange(8, dtype=np.uint64) * 4096)) is Status.OK
        )
        finish(source, target)


@pytest.fixture
def small():
    """A 64-page guest, session open, and four sealed records of 16 pages each."""
    memory = guest_memory(64, seed=3)
    source, target = pair(memory)
    records = [source.export(gpas) for gpas in batches(64, 16)]
    return memory, source, target, records


class TestAttacks:
    def test_replayed_record(self, small):
        """A record sent twice: REPLAY, and no commit."""
        _, _, target, records = small
        assert target.import_status(records[0]) is Status.OK
        assert target.import_status(records[0]) is Status.REPLAY
        refuses_commit(target)

    def test_swapped_gpas(self, small):
        """Two records' GPA lists exchanged: the tags fail."""
        _, _, target, records = small
        a, b = bytearray(records[0]), bytearray(records[1])
        entries = slice(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 16 * 16)
        a[entries], b[entries] = b[entries], a[entries]
        assert target.import_status(bytes(a)) is Status.AUTH_FAILED
        refuses_commit(target)

    def test_gpas_swapped_inside_a_record(self, small):
        """Two pages of one record exchanged (entries permuted): the tag fails."""
        _, _, target, records = small
        record = bytearray(records[0])
        first = slice(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 16)
        second = slice(RECORD_HEADER_SIZE + 16, RECORD_HEADER_SIZE + 32)
        record[first], record[second] = record[second], record[first]
        assert target.import_status(bytes(record)) is Status.AUTH_FAILED

    def test_dropped_record(self, small):
        """Record 1 never arrives: record 2 is OUT_OF_ORDER."""
        _, _, target, records = small
        assert target.import_status(records[0]) is Status.OK
        assert target.import_status(records[2]) is Status.OUT_OF_ORDER
        refuses_commit(target)

    def test_reordered_records(self, small):
        """Records 1 and 0 exchanged in time: OUT_OF_ORDER."""
        _, _, target, records = small
        assert target.import_status(records[1]) is Status.OUT_OF_ORDER
        refuses_commit(target)

    @pytest.mark.parametrize(
        "where",
        ["ciphertext", "tag", "gpa", "version", "seq"],
    )
    def test_flipped_bit(self, small, where):
        """One bit flipped in the body, the tag or the authenticated header: AUTH_FAILED."""
        _memory, _, target, records = small
        record = bytearray(records[0])
        offset = {
            "ciphertext": RECORD_HEADER_SIZE + 16 * 16 + 5000,
            "tag": len(record) - TAG_SIZE + 3,
            "gpa": RECORD_HEADER_SIZE + 16 * 3 + 2,  # page 3 -> 19: valid, not in the batch
            "version": RECORD_HEADER_SIZE + 16 * 3 + 8,
            "seq": 40,
        }[where]
        record[offset] ^= 0x01
        assert target.import_status(bytes(record)) is Status.AUTH_FAILED
        # The record's pages may have been opened in place: what keeps them from
        # running is that the session is poisoned.
        assert target.mh.state is MhState.FAILED
        refuses_commit(target)

    def test_spliced_from_another_migration(self, small):
        """A record of another migration of the same guest (same secret, other nonces)."""
        memory, _, target, _ = small
        other_source, _ = pair(memory)
        foreign = other_source.export(batches(64, 16)[0])
        assert target.import_status(foreign) is Status.AUTH_FAILED
        refuses_commit(target)

    def test_spliced_with_our_session_id(self, small):
        """A foreign record relabelled with our session id still fails its tag."""
        memory, _source, target, records = small
        other_source, _ = pair(memory)
        foreign = bytearray(other_source.export(batches(64, 16)[0]))
        foreign[8:40] = records[0][8:40]
        assert target.import_status(bytes(foreign)) is Status.AUTH_FAILED

    def test_truncated_stream(self, small):
        """The last record withheld: every import passes but the manifest does not."""
        _, source, target, records = small
        for record in records[:-1]:
            assert target.import_status(record) is Status.OK
        response = target.call(Command.MANIFEST, source.ok(Command.MANIFEST))
        assert response.status is Status.MISMATCH
        assert response.detail & MismatchBits.RECORD_COUNT
        refuses_commit(target)

    def test_suppressed_dirty_page(self, small):
        """A page the guest wrote after its export, never re-sent: the memory digest."""
        memory, source, target, records = small
        for record in records:
            assert target.import_status(record) is Status.OK
        memory[7, 100] ^= 1
        response = target.call(Command.MANIFEST, source.ok(Command.MANIFEST))
        assert response.status is Status.MISMATCH
        assert response.detail == MismatchBits.MEMORY
        refuses_commit(target)

    def test_manifest_from_another_migration(self, small):
        """A manifest of another session is AUTH_FAILED."""
        memory, _, target, records = small
        for record in records:
            assert target.import_status(record) is Status.OK
        other_source, _ = pair(memory)
        assert target.call(Command.MANIFEST, other_source.ok(Command.MANIFEST)).status is (
            Status.AUTH_FAILED
        )
        refuses_commit(target)

    def test_commit_before_manifest(self, small):
        """COMMIT without a verified manifest is BAD_STATE; the session stays usable."""
        _, source, target, records = small
        assert target.call(Command.COMMIT).status is Status.BAD_STATE
        for record in records:
            assert target.import_status(record) is Status.OK
        finish(source, target)


class TestCommitAndAbort:
    def test_source_retires_only_on_the_targets_receipt(self, small):
        """A forged or foreign receipt is AUTH_FAILED; the source stays sealed."""
        _, source, target, records = small
        for record in records:
            target.import_status(record)
        target.ok(Command.MANIFEST, source.ok(Command.MANIFEST))
        assert source.call(Command.COMMIT, b"\0" * 100).status is Status.BAD_REQUEST
        receipt = target.ok(Command.COMMIT)
        forged = bytearray(receipt)
        forged[-1] ^= 1
        assert source.call(Command.COMMIT, bytes(forged)).status is Status.AUTH_FAILED
        assert source.mh.state is MhState.SOURCE_SEALED
        source.ok(Command.COMMIT, receipt)
        assert source.mh.state is MhState.SOURCE_RETIRED

    def test_sealed_source_resumes_only_on_an_abort_token(self, small):
        """After its manifest the source aborts only with the target's token."""
        memory, source, target, _ = small
        source.ok(Command.MANIFEST)
        assert source.call(Command.ABORT).status is Status.BAD_REQUEST
        _, other_target = pair(memory)
        assert source.call(Command.ABORT, other_target.ok(Command.ABORT)).status is (
            Status.AUTH_FAILED
        )
        assert source.mh.state is MhState.SOURCE_SEALED
        token = target.ok(Command.ABORT)
        assert target.mh.state is MhState.IDLE
        source.ok(Command.ABORT, token)
        assert source.mh.state is MhState.IDLE

    def test_no_abort_after_commit(self, small):
        """A committed target and a retired source refuse ABORT."""
        _, source, target, records = small
        for record in records:
            target.import_status(record)
        finish(source, target)
        assert target.call(Command.ABORT).status is Status.BAD_STATE
        assert source.call(Command.ABORT).status is Status.BAD_STATE

    def test_abort_then_new_session_has_new_keys(self, small):
        """After ABORT, records of the old session are refused by the new one."""
        _memory, source, target, records = small
        target.ok(Command.ABORT)
        source.ok(Command.ABORT)
        open_session(source, target)
        assert target.import_status(records[0]) is Status.AUTH_FAILED


class TestRefusals:
    def test_export_without_session(self):
        """EXPORT before OPEN_SESSION is NO_SESSION."""
        host = Host(MigrationHandler(guest_memory(4), SECRET))
        response = host.call(Command.EXPORT_PAGES, pack_export_request([0]))
        assert response.status is Status.NO_SESSION

    def test_role_not_allowed(self):
        """A running guest's MH (source only) refuses to become a target."""
        host = Host(MigrationHandler(guest_memory(4), SECRET, roles=frozenset({Role.SOURCE})))
        response = host.call(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET).pack())
        assert response.status is Status.UNSUPPORTED
        assert host.mh.state is MhState.IDLE

    def test_reflected_nonce(self):
        """The host handing an MH its own nonce as the peer's is BAD_REQUEST."""
        host = Host(MigrationHandler(guest_memory(4), SECRET))
        own = host.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE).pack())[:32]
        response = host.call(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE, own).pack())
        assert response.status is Status.BAD_REQUEST

    def test_import_on_a_source(self, small):
        """IMPORT on the source is BAD_STATE; EXPORT on the target too."""
        _, source, target, records = small
        assert source.call(Command.IMPORT_PAGES, records[0]).status is Status.BAD_STATE
        response = target.call(Command.EXPORT_PAGES, pack_export_request([0]))
        assert response.status is Status.BAD_STATE

    @pytest.mark.parametrize(
        ("gpas", "status"),
        [
            ([1], Status.BAD_REQUEST),
            ([64 * PAGE_SIZE], Status.BAD_REQUEST),
            ([0, 0], Status.BAD_REQUEST),
            (list(range(0, 513 * PAGE_SIZE, PAGE_SIZE)), Status.TOO_LARGE),
        ],
    )
    def test_bad_export_batches(self, small, gpas, status):
        """Unaligned, outside RAM, repeated or too many GPAs; the stream does not move."""
        _, source, target, records = small
        assert source.call(Command.EXPORT_PAGES, pack_export_request(gpas)).status is status
        for record in [*records, source.export([0])]:
            assert target.import_status(record) is Status.OK
