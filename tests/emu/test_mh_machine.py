"""The Migration Handler inside emulated SEV machines: launch, mailbox, MH-to-MH migration.

Machines are built in this process (two emulated hosts, 32 MiB guests), so a
test can read the guest's own view of RAM; the host side drives the
mailboxes only through the shared file and the interrupt socket
(:mod:`mh_host_support`), as an agent would.
"""

from __future__ import annotations

import asyncio
import base64
import mmap
import os
from pathlib import Path

import attrs
import numpy as np
import pytest
from mh_host_support import MailboxHost, inject_master_secret
from psp_support import amd_root, make_psp
from qemu.qmp import ExecuteError
from sev_support import Owner, machine_process, qmp

from vmmig.errors import ConfigError
from vmmig.firmware.abi import (
    ABI_VERSION,
    HEADER_SIZE,
    PAGE_SIZE,
    Command,
    HelloReply,
    HelloRequest,
    OpenSessionReply,
    OpenSessionRequest,
    Role,
    Status,
    VcpuIndex,
    pack_export_request,
)
from vmmig.firmware.image import FIRMWARE_GPA, builtin_image
from vmmig.firmware.records import page_record_size
from vmmig.guests.ab_check import ab_passes, ab_region, check_ab
from vmmig.owner import (
    AttestationError,
    GuestOwner,
    LaunchKind,
    Refusal,
    TrustAnchor,
    attest_and_inject,
    expected_launch_for,
    launch_files,
)
from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.mh_layout import MhReservation
from vmmig.platforms.emu.qmp_schema import QmpCommandError


MIB = 1 << 20
MEMORY = 32 * MIB
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two emulated hosts of one AMD root: ``{name: (host_dir, psp)}``."""
    root = tmp_path_factory.mktemp("mh-hosts")
    return {name: (root / name, make_psp(root, name)) for name in ("host-a", "host-b")}


@pytest.fixture
def make(tmp_path, hosts):
    """``make(name, host, **config)`` -> (machine, owner): an in-process SEV machine."""
    made: list[Machine] = []

    def build(name: str, host: str = "host-a", **kwargs):
        host_dir, psp = hosts[host]
        owner = Owner(psp, kwargs.pop("tech", "sev"))
        config = owner.config(host_dir, tmp_path, **{"name": name, "memory": MEMORY, "vcpus": 1,
                                                     **kwargs})
        machine = Machine(config)
        made.append(machine)
        return machine, owner

    yield build
    for machine in made:
        machine.close()


def started(machine, owner) -> MailboxHost:
    """Inject the master secret, start the MH, connect to its mailbox."""
    inject_master_secret(machine, owner)
    qmp(machine, "x-mh-start")
    return MailboxHost(qmp(machine, "x-query-mh"))


def ok(response, what: str = ""):
    assert response.status is Status.OK, (what, response.status)
    return response


def open_session(source: MailboxHost, target: MailboxHost) -> None:
    """The nonce exchange, source first: source(0) -> target(Ns) -> source(Nt)."""
    ns = OpenSessionReply.unpack(ok(source.call(
        Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE).pack())).payload).own_nonce
    reply = OpenSessionReply.unpack(ok(target.call(
        Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET, ns).pack())).payload)
    back = OpenSessionReply.unpack(ok(source.call(
        Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE, reply.own_nonce).pack())).payload)
    assert back.session_id == reply.session_id != bytes(32)


def copy_all_pages(source: MailboxHost, target: MailboxHost, ram_pages: int) -> None:
    batch = source.layout.max_batch_pages
    for first in range(0, ram_pages, batch):
        gpas = np.arange(first, min(first + batch, ram_pages), dtype=np.uint64) * PAGE_SIZE
        record = ok(source.call(Command.EXPORT_PAGES, pack_export_request(gpas))).payload
        ok(target.call(Command.IMPORT_PAGES, record), f"import at page {first}")


def test_an_sev_guest_running_ab_migrates_mh_to_mh(make):
    """HELLO, nonces, every page exported and imported, MANIFEST, COMMIT, receipt; the
    source retires and refuses cont, the target runs on with the a-b rule intact."""
    source, source_owner = make("src")
    target, target_owner = make("dst", "host-b", incoming=True, mh_target=True)
    assert qmp(target, "query-status")["status"] == "inmigrate"
    src_host = started(source, source_owner)
    qmp(source, "cont")
    assert source.console.wait_for("B", 2, TIMEOUT), source.console.text
    dst_host = started(target, target_owner)
    try:
        hellos = [HelloReply.unpack(ok(host.call(Command.HELLO, HelloRequest(
            ABI_VERSION).pack())).payload) for host in (src_host, dst_host)]
        ram_pages = qmp(source, "x-query-mh")["mailbox-gpa"] // PAGE_SIZE
        assert [hello.ram_pages for hello in hellos] == [ram_pages, ram_pages]
        open_session(src_host, dst_host)
        assert qmp(source, "x-query-mh")["role"] == "source"
        qmp(source, "stop")
        passes = ab_passes(source.memory.ram)
        copy_all_pages(src_host, dst_host, ram_pages)
        sealed = ok(src_host.call(Command.MANIFEST)).payload
        with pytest.raises(QmpCommandError, match="abort token"):
            qmp(source, "cont")  # sealed: the target may commit any moment
        ok(dst_host.call(Command.MANIFEST, sealed), "manifest")
        with pytest.raises(QmpCommandError, match="committed an imported guest"):
            qmp(target, "cont")  # verified is not committed
        receipt = ok(dst_host.call(Command.COMMIT)).payload
        ok(src_host.call(Command.COMMIT, receipt), "receipt")
    finally:
        src_host.close()
        dst_host.close()
    assert qmp(source, "x-query-mh")["state"] == "retired"
    assert qmp(target, "x-query-mh")["state"] == "committed"
    for _ in range(2):  # for ever
        with pytest.raises(QmpCommandError, match="never runs again"):
            qmp(source, "cont")
    assert np.array_equal(target.memory.pages[:ram_pages], source.memory.pages[:ram_pages])
    qmp(target, "x-vcpu-state-import", vmsas=qmp(source, "x-vcpu-state-export"))
    qmp(target, "cont")
    assert target.console.wait_for("B", 2, TIMEOUT), target.console.text
    qmp(target, "stop")
    assert ab_passes(target.memory.ram) > passes
    verdict = check_ab(target.memory.ram)
    assert verdict.ok, verdict


def test_the_target_refuses_cont_until_its_mh_committed(make):
    target, owner = make("dst", incoming=True, mh_target=True)
    with pytest.raises(QmpCommandError, match="committed an imported guest"):
        qmp(target, "cont")
    host = started(target, owner)
    try:
        with pytest.raises(QmpCommandError, match=r"committed an imported guest \(MH state: "
                                                  r"running\)"):
            qmp(target, "cont")
        assert qmp(target, "query-status")["status"] == "inmigrate"
        # A target's MH may not act as a source (a launch-time, measured choice).
        reply = host.call(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE).pack())
        assert reply.status is Status.UNSUPPORTED
    finally:
        host.close()


def test_a_source_resumes_after_abort_with_the_targets_token(make):
    """Sealed: no cont; the target's abort token lets the source ABORT and run again."""
    source, source_owner = make("src")
    target, target_owner = make("dst", "host-b", incoming=True, mh_target=True)
    src_host, dst_host = started(source, source_owner), started(target, target_owner)
    try:
        open_session(src_host, dst_host)
        ok(src_host.call(Command.MANIFEST))
        with pytest.raises(QmpCommandError, match="abort token"):
            qmp(source, "cont")
        assert src_host.call(Command.ABORT).status is Status.BAD_REQUEST  # no token, no resume
        token = ok(dst_host.call(Command.ABORT)).payload
        ok(src_host.call(Command.ABORT, token))
        qmp(source, "cont")
        assert source.console.wait_for("B", 1, TIMEOUT), source.console.text
        assert qmp(source, "x-query-mh")["state"] == "running"
    finally:
        src_host.close()
        dst_host.close()


@pytest.mark.parametrize("tech", ["sev", "sev-es"])
def test_the_mh_refuses_to_start_without_the_owners_secret(make, tech):
    machine, owner = make("src", tech=tech)
    with pytest.raises(QmpCommandError, match="MH: no secret in the secret area"):
        qmp(machine, "x-mh-start")
    info = qmp(machine, "x-query-mh")
    assert info["state"] == "stopped"
    assert info["role"] is None
    assert not Path(info["irq-path"]).exists()
    assert qmp(machine, "x-query-shared") == []
    inject_master_secret(machine, owner)
    qmp(machine, "x-mh-start")
    with pytest.raises(QmpCommandError, match="already running"):
        qmp(machine, "x-mh-start")
    assert qmp(machine, "x-query-mh")["state"] == "running"


def test_the_mailbox_is_shared_and_a_canary_elsewhere_stays_ciphertext(make):
    """The host reads the region header in the clear; a private page stays ciphertext;
    the workload ends below the reservation."""
    machine, owner = make("src")
    host = started(machine, owner)
    try:
        info = qmp(machine, "x-query-mh")
        gpa, size = info["mailbox-gpa"], info["mailbox-size"]
        assert gpa % (2 * MIB) == 0
        assert MEMORY - 2 * MIB < gpa + size <= MEMORY
        assert ab_region(machine.memory.ram) == (MIB, gpa)
        assert qmp(machine, "x-query-shared") == [{"gpa": gpa, "pages": -(-size // PAGE_SIZE)}]
        assert host.region[:4] == b"VMMB"
        header = base64.b64decode(qmp(machine, "x-memory-read", gpa=gpa, size=64)["data"])
        assert header == bytes(host.region[:64])
        canary = b"guest-private-canary-0123456789!"
        where = 8 * MIB + 256
        machine.memory.ram[where:where + len(canary)] = canary
        seen = base64.b64decode(qmp(machine, "x-memory-read", gpa=where, size=64)["data"])
        assert canary[:16] not in seen
        with Path(info["shared-path"]).open("rb") as shared, \
                mmap.mmap(shared.fileno(), 0, prot=mmap.PROT_READ) as segment:
            assert segment.find(canary[:16]) == -1
    finally:
        host.close()


def test_malformed_requests_and_stray_wakeups_do_not_stop_the_mh(make):
    machine, owner = make("src", mh_queues=2)
    host = started(machine, owner)
    try:
        assert host.layout.queue_count == 2
        # A payload length far beyond the slot, then garbage: both refused, the MH goes on.
        bogus = (0x01).to_bytes(4, "little") + (0xFFFFFFF0).to_bytes(4, "little") + bytes(24)
        assert host.wait(host.post(bogus)).status is Status.BAD_REQUEST
        assert host.wait(host.post(b"\xff" * 40, queue=1)).status is Status.BAD_REQUEST
        unknown = (0xEE).to_bytes(4, "little") + bytes(28)
        assert host.wait(host.post(unknown, queue=1), queue=1).status is Status.UNSUPPORTED
        host.irq.send(b"\x07\x09\xfe")  # no such queues, nothing posted: no answer, no harm
        hello = host.call(Command.HELLO, HelloRequest(ABI_VERSION).pack(), queue=1)
        assert HelloReply.unpack(ok(hello).payload).state == 0
        ok(host.call(Command.HELLO, HelloRequest(ABI_VERSION).pack()))
    finally:
        host.close()
    assert qmp(machine, "x-query-mh")["state"] == "running"


def test_a_foreign_firmware_is_measured_and_never_run(make):
    """The owner's expectation of the built-in MH differs; the emulator cannot run it."""
    image = bytearray(builtin_image())
    image[-2] ^= 0x20  # one character of the MH's sources
    machine, owner = make("src", firmware=bytes(image))
    assert bytes(machine.memory.ram[FIRMWARE_GPA:FIRMWARE_GPA + len(image)]) == image
    builtin = expected_launch_for("sev", memory=MEMORY, vcpus=1, workload="ab")
    foreign = expected_launch_for("sev", memory=MEMORY, vcpus=1, workload="ab",
                                  firmware=bytes(image))
    assert builtin.digest != foreign.digest
    inject_master_secret(machine, owner)  # this owner expects exactly that image
    with pytest.raises(QmpCommandError, match="not vmmig's built-in Migration Handler"):
        qmp(machine, "x-mh-start")


def test_mh_options_are_checked(make, tmp_path):
    with pytest.raises(ConfigError, match="add --incoming"):
        make("dst", mh_target=True)
    with pytest.raises(ConfigError, match="1 to 4"):
        make("src", mh_queues=5)
    with pytest.raises(ConfigError, match="no room for the workload"):
        make("src", mh_queues=4, memory=16 * MIB)
    with pytest.raises(ConfigError, match="only sev and sev-es machines take --firmware"):
        Machine(MachineConfig(name="plain", memory=16 * MIB, run_dir=tmp_path,
                              firmware=builtin_image()))
    plain = Machine(MachineConfig(name="plain", memory=16 * MIB, run_dir=tmp_path))
    try:
        with pytest.raises(QmpCommandError, match="no Migration Handler"):
            qmp(plain, "x-query-mh")
    finally:
        plain.close()


@pytest.mark.parametrize("modified", [True, False], ids=["modified", "built-in"])
def test_a_target_with_a_modified_firmware_image_gets_no_secret(tmp_path, hosts, modified):
    """``vmmig emu start --firmware FILE``: the owner expects the built-in MH and refuses
    another; the built-in one (the default) gets its secret."""
    host_dir, psp = hosts["host-a"]
    owner = GuestOwner.open(tmp_path / "owner",
                            TrustAnchor(amd_root().ask_cert, amd_root().ark_cert))
    owner.expect("web-1", expected_launch_for("sev", memory=16 * MIB, vcpus=2, workload="idle",
                                              mh_target=True))
    files = launch_files(owner, "web-1", psp.chain, tmp_path, kind=LaunchKind.MIGRATION_TARGET)
    firmware = tmp_path / "mh.bin"
    firmware.write_bytes(builtin_image().replace(b"MigrationHandler", b"MigrationHandlex", 1)
                         if modified else builtin_image())

    async def scenario():
        async with machine_process(tmp_path, "--host-dir", str(host_dir), "--tech", "sev",
                                   "--workload", "idle", "--incoming", "--mh-target",
                                   "--firmware", str(firmware), *files.emu_options()) as client:
            assert (await client.execute("query-status"))["status"] == "inmigrate"
            if not modified:
                await attest_and_inject(owner, "web-1", client.execute,
                                        session=files.offer.session)
                await client.execute("x-mh-start")
                return
            with pytest.raises(AttestationError) as info:
                await attest_and_inject(owner, "web-1", client.execute,
                                        session=files.offer.session)
            assert info.value.reason is Refusal.MEASUREMENT_MISMATCH
            with pytest.raises(ExecuteError, match="built-in Migration Handler"):
                await client.execute("x-mh-start")

    asyncio.run(scenario())


@pytest.mark.parametrize(("memory", "batch"), [(32 * MIB, 512), (511 * MIB, 512),
                                                (512 * MIB, 1024), (4096 * MIB, 1024)])
def test_large_guests_get_larger_records_and_the_mailbox_fits_them(memory, batch):
    """From 512 MiB of RAM on, a record holds 1024 pages; the slots fit a full reply."""
    reservation = MhReservation(memory)
    layout = reservation.layout
    assert layout.max_batch_pages == batch
    assert layout.slot_capacity >= HEADER_SIZE + page_record_size(batch)
    assert reservation.reserved_size >= layout.region_size
    assert reservation.mailbox_gpa % (2 * MIB) == 0


@pytest.mark.parametrize("tech", ["sev-es", "sev"])
def test_a_secret_in_a_register_crosses_the_host_only_sealed_on_sev_es(make, tech):
    """A secret the guest keeps in a register of its stopped vCPU: on SEV-ES the
    hypervisor may not read it, nothing the host reads from the source's mailbox or
    hands to the target's holds it, and the target's vCPU has it after COMMIT.  On SEV
    the hypervisor's own register export shows it (the search can find it)."""
    canary = int.from_bytes(os.urandom(8), "little") | 1 << 63
    source, source_owner = make("src", tech=tech)
    target, target_owner = make("dst", "host-b", incoming=True, mh_target=True, tech=tech)
    src_host = started(source, source_owner)
    qmp(source, "cont")
    assert source.console.wait_for("B", 1, TIMEOUT), source.console.text
    dst_host = started(target, target_owner)
    relayed = bytearray()  # everything the host carries from one MH to the other
    try:
        open_session(src_host, dst_host)
        qmp(source, "stop")
        vcpu = source.vcpus[0]
        vcpu.load_vmsa(attrs.evolve(vcpu.vmsa, r12=canary))  # the guest keeps its secret
        if tech == "sev":
            exported = base64.b64decode(qmp(source, "x-vcpu-state-export")[0])
            assert canary.to_bytes(8, "little") in exported
            return
        with pytest.raises(QmpCommandError, match="out of the hypervisor's reach"):
            qmp(source, "x-vcpu-state-export")
        ram_pages = qmp(source, "x-query-mh")["mailbox-gpa"] // PAGE_SIZE
        batch = src_host.layout.max_batch_pages
        for first in range(0, ram_pages, batch):
            gpas = np.arange(first, min(first + batch, ram_pages), dtype=np.uint64) * PAGE_SIZE
            record = ok(src_host.call(Command.EXPORT_PAGES, pack_export_request(gpas))).payload
            relayed += record
            ok(dst_host.call(Command.IMPORT_PAGES, record))
        for index in range(len(source.vcpus)):
            record = ok(src_host.call(Command.EXPORT_CPU_STATE, VcpuIndex(index).pack())).payload
            relayed += record
            ok(dst_host.call(Command.IMPORT_CPU_STATE, record))
        sealed = ok(src_host.call(Command.MANIFEST)).payload
        relayed += sealed
        ok(dst_host.call(Command.MANIFEST, sealed))
        assert target.vcpus[0].vmsa.r12 != canary, "no register before COMMIT"
        receipt = ok(dst_host.call(Command.COMMIT)).payload
        ok(src_host.call(Command.COMMIT, receipt))
    finally:
        src_host.close()
        dst_host.close()
    assert canary.to_bytes(8, "little") not in relayed
    assert target.vcpus[0].vmsa.r12 == canary
    with pytest.raises(QmpCommandError, match="out of the hypervisor's reach"):
        qmp(target, "x-vcpu-state-export")
