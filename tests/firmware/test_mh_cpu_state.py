"""SEV-ES CPU state through the MH: vCPU states sealed in the data stream, staged on the
target, counted by the manifest and restored only at COMMIT; and a hostile host's attacks."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pytest
from mh_support import SECRET, Host, batches, guest_memory, open_session

from vmmig.firmware.abi import (
    Capability,
    Command,
    HelloReply,
    HelloRequest,
    OpenSessionRequest,
    Role,
    Status,
    VcpuIndex,
)
from vmmig.firmware.cpus import CPU_STATE_SIZE
from vmmig.firmware.envelope import RECORD_HEADER_SIZE, TAG_SIZE, RecordKind
from vmmig.firmware.handler import MigrationHandler
from vmmig.firmware.keys import derive_session_keys
from vmmig.firmware.manifest import Manifest, MismatchBits, cpu_digest
from vmmig.firmware.states import MhState


class FakeCpus:
    """A guest's vCPUs: fixed states to save, and a log of every restore."""

    def __init__(self, states: list[bytes]) -> None:
        self.states = states
        self.restored: list[dict[int, bytes]] = []

    @property
    def count(self) -> int:
        return len(self.states)

    def save(self, index: int) -> bytes:
        return self.states[index]

    def restore(self, states: Mapping[int, bytes]) -> None:
        self.restored.append(dict(states))


def vmsas(count: int, seed: int) -> list[bytes]:
    """``count`` random vCPU states."""
    rng = np.random.default_rng(seed)
    return [rng.bytes(CPU_STATE_SIZE) for _ in range(count)]


class Migration(NamedTuple):
    source: Host
    target: Host
    source_cpus: FakeCpus | None
    target_cpus: FakeCpus


def es_migration(memory: np.ndarray, source_vcpus: int | None = 4, target_vcpus: int = 4,
                 seed: int = 7) -> Migration:
    """A source MH over ``memory`` with ``source_vcpus`` vCPUs (None: an SEV source), a
    target MH over zeroed RAM with ``target_vcpus``, session open."""
    source_cpus = None if source_vcpus is None else FakeCpus(vmsas(source_vcpus, seed))
    target_cpus = FakeCpus([bytes(CPU_STATE_SIZE)] * target_vcpus)
    source = Host(MigrationHandler(memory, SECRET, cpus=source_cpus))
    target = Host(MigrationHandler(np.zeros_like(memory), SECRET, cpus=target_cpus))
    open_session(source, target)
    return Migration(source, target, source_cpus, target_cpus)


def export_cpu(source: Host, index: int) -> bytes:
    return source.ok(Command.EXPORT_CPU_STATE, VcpuIndex(index).pack())


_IMPORT = {RecordKind.PAGES: Command.IMPORT_PAGES, RecordKind.CPU_STATE: Command.IMPORT_CPU_STATE}


def deliver(target: Host, record: bytes) -> Status:
    """Import ``record`` with the command its kind calls for, as a host would."""
    kind = RecordKind(int.from_bytes(record[4:6], "little"))
    return target.call(_IMPORT[kind], record).status


def refuses_commit(migration: Migration) -> None:
    """The target's session is poisoned and no vCPU got a state."""
    target = migration.target
    assert target.mh.state is MhState.FAILED
    assert target.call(Command.MANIFEST, b"").status is Status.BAD_STATE
    assert target.call(Command.COMMIT).status is Status.BAD_STATE
    assert migration.target_cpus.restored == []


class Stream(NamedTuple):
    migration: Migration
    pages: list[bytes]
    cpus: list[bytes]


@pytest.fixture
def stream() -> Stream:
    """A 32-page, 4-vCPU guest: two page records (sequence 0, 1), then the four vCPU
    states in index order (2 .. 5), all sealed and none delivered."""
    migration = es_migration(guest_memory(32, seed=3))
    pages = [migration.source.export(gpas) for gpas in batches(32, 16)]
    cpus = [export_cpu(migration.source, index) for index in range(4)]
    return Stream(migration, pages, cpus)


class TestRoundTrip:
    def test_pages_and_four_vcpus(self):
        """Pages and vCPU states interleaved in one stream: the target's vCPUs get exactly
        the source's states, in one restore at COMMIT, and not before."""
        memory = guest_memory(64, seed=5)
        migration = es_migration(memory)
        source, target, source_cpus, target_cpus = migration
        assert source_cpus is not None
        pages = iter(batches(64, 16))
        order = ["pages", 2, "pages", 0, 3, "pages", "pages", 1]
        for item in order:
            record = source.export(next(pages)) if item == "pages" else export_cpu(source, item)
            assert deliver(target, record) is Status.OK
        target.ok(Command.MANIFEST, source.ok(Command.MANIFEST))
        assert target_cpus.restored == []
        receipt = target.ok(Command.COMMIT)
        assert target_cpus.restored == [dict(enumerate(source_cpus.states))]
        source.ok(Command.COMMIT, receipt)
        assert source.mh.state is MhState.SOURCE_RETIRED
        assert source_cpus.restored == []
        assert np.array_equal(target.mh.memory, memory)

    def test_import_reply_names_the_vcpu(self, stream):
        """IMPORT_CPU_STATE answers with the index of the vCPU whose state it staged."""
        target = stream.migration.target
        for record in stream.pages:
            assert deliver(target, record) is Status.OK
        reply = target.ok(Command.IMPORT_CPU_STATE, stream.cpus[0])
        assert VcpuIndex.unpack(reply) == VcpuIndex(0)

    def test_hello_advertises_cpu_state_only_with_vcpus(self):
        """An MH given the guest's vCPUs sets capability CPU_STATE; an SEV guest's does not."""
        memory = guest_memory(4)
        for cpus, expected in [(FakeCpus(vmsas(2, 0)), True), (None, False)]:
            host = Host(MigrationHandler(memory, SECRET, cpus=cpus))
            reply = HelloReply.unpack(host.ok(Command.HELLO, HelloRequest(1).pack()))
            assert bool(reply.capabilities & Capability.CPU_STATE) is expected

    def test_abort_restores_nothing(self, stream):
        """A verified target that aborts hands no state to its vCPUs."""
        migration = stream.migration
        for record in [*stream.pages, *stream.cpus]:
            assert deliver(migration.target, record) is Status.OK
        migration.target.ok(Command.MANIFEST, migration.source.ok(Command.MANIFEST))
        migration.target.ok(Command.ABORT)
        assert migration.target.mh.state is MhState.IDLE
        assert migration.target_cpus.restored == []


class TestSourceRefusals:
    def test_manifest_needs_every_vcpu(self):
        """The source seals no manifest while a vCPU's state is not in the stream."""
        migration = es_migration(guest_memory(8))
        source = migration.source
        for index in (0, 1, 3):
            export_cpu(source, index)
        assert source.call(Command.MANIFEST).status is Status.BAD_STATE
        assert source.mh.state is MhState.SOURCE_OPEN
        export_cpu(source, 2)
        source.ok(Command.MANIFEST)

    def test_vcpu_exported_once_per_session(self, stream):
        """A second export of a vCPU is BAD_REQUEST and the stream does not move."""
        migration = stream.migration
        response = migration.source.call(Command.EXPORT_CPU_STATE, VcpuIndex(1).pack())
        assert response.status is Status.BAD_REQUEST
        for record in [*stream.pages, *stream.cpus, migration.source.export([0])]:
            assert deliver(migration.target, record) is Status.OK

    @pytest.mark.parametrize(
        "payload",
        [VcpuIndex(4).pack(), VcpuIndex(0).pack()[:4] + b"\1\0\0\0", b"\0" * 4, b"\0" * 12],
        ids=["index-out-of-range", "reserved-set", "short", "long"],
    )
    def test_bad_requests(self, payload):
        """An index the guest lacks or a malformed payload: BAD_REQUEST, nothing exported."""
        migration = es_migration(guest_memory(8))
        response = migration.source.call(Command.EXPORT_CPU_STATE, payload)
        assert response.status is Status.BAD_REQUEST
        assert deliver(migration.target, export_cpu(migration.source, 0)) is Status.OK

    def test_cpu_state_moves_only_in_an_open_session(self, stream):
        """As for pages: NO_SESSION before a session, BAD_STATE on the wrong side."""
        migration = stream.migration
        idle = Host(MigrationHandler(guest_memory(4), SECRET, cpus=FakeCpus(vmsas(1, 0))))
        assert idle.call(Command.EXPORT_CPU_STATE, VcpuIndex(0).pack()).status is (
            Status.NO_SESSION
        )
        assert migration.source.call(Command.IMPORT_CPU_STATE, stream.cpus[0]).status is (
            Status.BAD_STATE
        )
        assert migration.target.call(Command.EXPORT_CPU_STATE, VcpuIndex(0).pack()).status is (
            Status.BAD_STATE
        )


class TestAttacks:
    def test_replayed_record(self, stream):
        """A CPU-state record delivered twice: REPLAY, and no commit."""
        target = stream.migration.target
        for record in [*stream.pages, stream.cpus[0]]:
            assert deliver(target, record) is Status.OK
        assert deliver(target, stream.cpus[0]) is Status.REPLAY
        refuses_commit(stream.migration)

    def test_swapped_records(self, stream):
        """Two CPU-state records delivered in each other's place: OUT_OF_ORDER."""
        target = stream.migration.target
        for record in stream.pages:
            assert deliver(target, record) is Status.OK
        assert deliver(target, stream.cpus[1]) is Status.OUT_OF_ORDER
        refuses_commit(stream.migration)

    @pytest.mark.parametrize("relabelled", [False, True])
    def test_from_another_migration(self, stream, relabelled):
        """vCPU 0's record from another migration of the same guest, as it is or with our
        session id written over its own: AUTH_FAILED."""
        target = stream.migration.target
        for record in stream.pages:
            assert deliver(target, record) is Status.OK
        other = es_migration(stream.migration.source.mh.memory)
        other.source.export(batches(32, 16)[0])
        other.source.export(batches(32, 16)[1])
        foreign = bytearray(export_cpu(other.source, 0))  # the same sequence number as ours
        if relabelled:
            foreign[8:40] = stream.cpus[0][8:40]
        assert deliver(target, bytes(foreign)) is Status.AUTH_FAILED
        refuses_commit(stream.migration)

    @pytest.mark.parametrize(
        ("where", "offset"),
        [
            ("index", RECORD_HEADER_SIZE),  # byte 0 of the body: vCPU 0 -> 1
            ("state", RECORD_HEADER_SIZE + 8 + 1000),
            ("tag", RECORD_HEADER_SIZE + 4104 + TAG_SIZE // 2),
            ("seq", 40),
        ],
    )
    def test_flipped_bit(self, stream, where, offset):
        """One bit flipped in the sealed index or state, the tag or the header: AUTH_FAILED
        (the index is inside the ciphertext, so relabelling a state fails too)."""
        target = stream.migration.target
        for record in stream.pages:
            assert deliver(target, record) is Status.OK
        record = bytearray(stream.cpus[0])
        record[offset] ^= 0x01
        assert deliver(target, bytes(record)) is Status.AUTH_FAILED
        refuses_commit(stream.migration)

    def test_withheld_vcpu(self, stream):
        """The last vCPU's record never arrives: the manifest shows it (CPU_STATE)."""
        migration = stream.migration
        for record in [*stream.pages, *stream.cpus[:-1]]:
            assert deliver(migration.target, record) is Status.OK
        response = migration.target.call(Command.MANIFEST, migration.source.ok(Command.MANIFEST))
        assert response.status is Status.MISMATCH
        assert response.detail & MismatchBits.CPU_STATE
        refuses_commit(migration)

    def test_source_with_fewer_vcpus(self):
        """A source that exported all its 3 vCPUs cannot complete a 4-vCPU target: the
        manifest agrees with what was staged but not with the target's vCPU count."""
        migration = es_migration(guest_memory(8), source_vcpus=3)
        assert deliver(migration.target, migration.source.export(batches(8, 8)[0])) is Status.OK
        for index in range(3):
            assert deliver(migration.target, export_cpu(migration.source, index)) is Status.OK
        response = migration.target.call(Command.MANIFEST, migration.source.ok(Command.MANIFEST))
        assert (response.status, response.detail) == (Status.MISMATCH, MismatchBits.CPU_STATE)
        refuses_commit(migration)

    def test_sev_source_into_an_sev_es_target(self):
        """A manifest without CPU state (an SEV source) cannot commit an SEV-ES target."""
        memory = guest_memory(8)
        migration = es_migration(memory, source_vcpus=None)
        assert deliver(migration.target, migration.source.export(batches(8, 8)[0])) is Status.OK
        response = migration.target.call(Command.MANIFEST, migration.source.ok(Command.MANIFEST))
        assert (response.status, response.detail) == (Status.MISMATCH, MismatchBits.CPU_STATE)
        refuses_commit(migration)

    def test_state_for_a_vcpu_the_target_lacks(self):
        """vCPU 4 of a 5-vCPU source into a 4-vCPU target: MISMATCH (CPU_STATE) on import."""
        migration = es_migration(guest_memory(8), source_vcpus=5)
        response = migration.target.call(Command.IMPORT_CPU_STATE, export_cpu(migration.source, 4))
        assert (response.status, response.detail) == (Status.MISMATCH, MismatchBits.CPU_STATE)
        refuses_commit(migration)

    def test_forked_source(self):
        """Two copies of the source in one session (a host that forked it before its nonce
        was drawn) each seal a state for vCPU 0: the second one is REPLAY."""
        memory = guest_memory(8)

        def fixed_nonce(size: int) -> bytes:
            return b"\x5a" * size

        original, fork = (
            Host(MigrationHandler(memory, SECRET, random=fixed_nonce, cpus=FakeCpus(vmsas(4, s))))
            for s in (1, 2)
        )
        target_cpus = FakeCpus([bytes(CPU_STATE_SIZE)] * 4)
        target = Host(MigrationHandler(np.zeros_like(memory), SECRET, cpus=target_cpus))
        target_nonce = target.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET).pack())[:32]
        for source in (original, fork):
            request = OpenSessionRequest(Role.SOURCE, target_nonce).pack()
            source_nonce = source.ok(Command.OPEN_SESSION, request)[:32]
        target.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET, source_nonce).pack())
        assert deliver(target, export_cpu(original, 0)) is Status.OK  # sequence 0
        export_cpu(fork, 1)  # sequence 0, never delivered
        assert deliver(target, export_cpu(fork, 0)) is Status.REPLAY  # sequence 1
        refuses_commit(Migration(original, target, None, target_cpus))

    def test_record_sent_with_the_wrong_command(self, stream):
        """A CPU-state record to IMPORT_PAGES, or a page record to IMPORT_CPU_STATE: the
        kind is framing (BAD_REQUEST), nothing changes and the migration still completes."""
        migration = stream.migration
        target = migration.target
        assert target.call(Command.IMPORT_PAGES, stream.cpus[0]).status is Status.BAD_REQUEST
        assert target.call(Command.IMPORT_CPU_STATE, stream.pages[0]).status is (
            Status.BAD_REQUEST
        )
        for record in [*stream.pages, *stream.cpus]:
            assert deliver(target, record) is Status.OK
        target.ok(Command.MANIFEST, migration.source.ok(Command.MANIFEST))
        target.ok(Command.COMMIT)
        assert len(migration.target_cpus.restored) == 1


class TestSevGuest:
    @pytest.mark.parametrize("command", [Command.EXPORT_CPU_STATE, Command.IMPORT_CPU_STATE])
    def test_cpu_commands_are_unsupported(self, command):
        """An MH without vCPUs (SEV: the hypervisor moves the registers) refuses the CPU-state
        commands with UNSUPPORTED, in or out of a session; nothing changes."""
        memory = guest_memory(4)
        source = Host(MigrationHandler(memory, SECRET))
        target = Host(MigrationHandler(np.zeros_like(memory), SECRET))
        assert source.call(command, VcpuIndex(0).pack()).status is Status.UNSUPPORTED
        open_session(source, target)
        for host in (source, target):
            assert host.call(command, VcpuIndex(0).pack()).status is Status.UNSUPPORTED
        assert (source.mh.state, target.mh.state) == (MhState.SOURCE_OPEN, MhState.TARGET_OPEN)

    def test_manifest_body_keeps_v1_reserved_bytes_zero(self):
        """Without CPU state the manifest's vCPU count (offset 24) and CPU digest (offset 96)
        are zero: an SEV manifest is byte for byte what it was before CPU state existed."""
        memory = guest_memory(4)
        keys = derive_session_keys(SECRET, b"\xaa" * 32, b"\xbb" * 32)
        body = Manifest.of(keys, memory, np.ones(4, np.uint64), 1, {}).pack()
        assert len(body) == 128
        assert body[24:32] == bytes(8)
        assert body[96:128] == bytes(32)


class TestCpuDigest:
    def test_covers_index_and_state_in_index_order(self):
        """SHA-256 over ``u32 index || state`` per vCPU, in index order whatever the
        mapping's order: two states exchanged between vCPUs change it."""
        a, b = vmsas(2, 4)
        expected = hashlib.sha256(b"\0\0\0\0" + a + b"\1\0\0\0" + b).digest()
        assert cpu_digest({1: b, 0: a}) == expected
        assert cpu_digest({0: b, 1: a}) != expected
