"""The PSP's own migration path over QMP: SEV and SEV-ES guests between two emulated hosts.

Source and target are machines built in this process on two hosts (each its
own PSP and PDH, both endorsed by the tests' AMD root), driven only through
their QMP commands; the guest's own view of its RAM (``machine.memory.ram``)
and its console show that it arrived intact and runs on.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from psp_support import make_psp
from sev_support import MEMORY, POLICIES, Owner, b64, machine_process, qmp

from vmmig.cli import main
from vmmig.guests.ab_check import AB_START, ab_passes, check_ab
from vmmig.guests.emu import PROGRAM_GPA
from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.psp import Policy
from vmmig.platforms.emu.qmp_schema import QmpCommandError
from vmmig.platforms.emu.sev_launch import SevConfig
from vmmig.platforms.emu.sev_migration_qmp import MAX_BATCH_PAGES, MAX_TRANSFER


PAGE = 4096


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two emulated hosts' state directories and the source host's PSP (the owner's view)."""
    where = tmp_path_factory.mktemp("psp-migration-hosts")
    source_psp = make_psp(where, "host-a")
    make_psp(where, "host-b")
    return where / "host-a", where / "host-b", source_psp


@pytest.fixture
def machines(tmp_path, hosts):
    """``source(tech, policy=None)`` and ``target(tech)`` build machines; closed after the test."""
    source_dir, target_dir, source_psp = hosts
    made: list[Machine] = []

    def build(config: MachineConfig) -> Machine:
        made.append(Machine(config))
        return made[-1]

    def source(tech: str, policy: Policy | None = None) -> Machine:
        return build(Owner(source_psp, tech, policy).config(source_dir, tmp_path, name="source"))

    def target(tech: str) -> Machine:
        sev = SevConfig(POLICIES[tech], b"", b"", target_dir)
        return build(MachineConfig(name="target", memory=MEMORY, vcpus=2, tech=tech,
                                   incoming=True, run_dir=tmp_path, sev=sev))

    yield source, target
    for machine in made:
        machine.close()


def _running_then_paused(source: Machine) -> None:
    """Finish the launch, let the a-b guest make two passes, and pause it."""
    qmp(source, "cont")
    assert source.console.wait_for("B", 2, timeout=30), source.console.text
    qmp(source, "stop")


def _start(source: Machine, target: Machine) -> dict[str, object]:
    """SEND_START towards the target's PDH and chain, then RECEIVE_START there."""
    caps = qmp(target, "query-sev-capabilities")
    started = qmp(source, "x-sev-send-start", pdh_cert=caps["pdh"], plat_certs=caps["cert-chain"])
    assert sorted(started) == ["dh-cert", "policy", "session"]
    assert len(base64.b64decode(started["dh-cert"])) == 0x824
    assert len(base64.b64decode(started["session"])) == 0x80
    assert qmp(target, "x-sev-receive-start", **started)["handle"] > 0
    return started


def _send_pages(source: Machine, target: Machine) -> None:
    for gpa in range(0, MEMORY, MAX_TRANSFER):
        packet = qmp(source, "x-sev-send-update-data", gpa=gpa, length=MAX_TRANSFER)
        qmp(target, "x-sev-receive-update-data", gpa=gpa, **packet)


def _send_page_batches(source: Machine, target: Machine) -> None:
    """One PSP command per page, as KVM, batched over QMP."""
    for first in range(0, MEMORY // PAGE, MAX_BATCH_PAGES):
        gpas = [page * PAGE for page in range(first, min(first + MAX_BATCH_PAGES,
                                                          MEMORY // PAGE))]
        packets = qmp(source, "x-sev-send-update-pages", gpas=gpas)["packets"]
        assert all(len(base64.b64decode(p["data"])) == PAGE for p in packets)
        qmp(target, "x-sev-receive-update-pages",
            packets=[{"gpa": gpa, **p} for gpa, p in zip(gpas, packets, strict=True)])


def _send_registers(source: Machine, target: Machine) -> None:
    """SEV-ES: the VMSAs through the PSPs; SEV: the hypervisor copies the registers."""
    if source.config.tech == "sev-es":
        for vcpu in range(len(source.vcpus)):
            packet = qmp(source, "x-sev-send-update-vmsa", vcpu=vcpu)
            qmp(target, "x-sev-receive-update-vmsa", vcpu=vcpu, **packet)
    else:
        qmp(target, "x-vcpu-state-import", vmsas=qmp(source, "x-vcpu-state-export"))


def _host_view(machine: Machine, gpa: int, size: int = PAGE) -> bytes:
    return base64.b64decode(qmp(machine, "x-memory-read", gpa=gpa, size=size)["data"])


class TestMigration:
    @pytest.mark.parametrize(("tech", "send_pages"), [
        ("sev", _send_pages), ("sev-es", _send_pages), ("sev", _send_page_batches),
    ])
    def test_the_ab_guest_moves_to_another_host_and_runs_on(self, machines, tech, send_pages):
        """Pause, every page and the registers through both PSPs, finish, cont: the target's
        RAM is the source's, the a-b rule holds, and the guest makes passes there."""
        make_source, make_target = machines
        source, target = make_source(tech), make_target(tech)
        assert qmp(target, "query-status")["status"] == "inmigrate"
        assert qmp(target, "query-sev")["state"] == "uninit"
        _running_then_paused(source)
        passes = ab_passes(source.memory.ram)
        image = bytes(source.memory.ram)

        _start(source, target)
        assert qmp(source, "query-sev")["state"] == "send-update"
        assert qmp(target, "query-sev")["state"] == "receive-update"
        send_pages(source, target)
        _send_registers(source, target)
        qmp(source, "x-sev-send-finish")
        qmp(target, "x-sev-receive-finish")

        assert bytes(target.memory.ram) == image
        assert check_ab(target.memory.ram).ok
        assert qmp(source, "query-status")["status"] == "postmigrate"
        assert qmp(source, "query-sev")["state"] == "sent"
        assert qmp(target, "query-sev")["policy"] == POLICIES[tech].value
        # The same plaintext under another VEK: the hypervisors read different ciphertext.
        assert _host_view(source, AB_START) != _host_view(target, AB_START)

        qmp(target, "cont")
        assert qmp(target, "query-status")["status"] == "running"
        assert target.console.wait_for("B", 1, timeout=30), target.console.text
        qmp(target, "stop")
        assert ab_passes(target.memory.ram) > passes
        assert check_ab(target.memory.ram).ok
        # The source's guest was sent: it never runs again (no clone).
        with pytest.raises(QmpCommandError, match=r"INVALID_GUEST_STATE.*SENT"):
            qmp(source, "cont")

    def test_the_hypervisor_sees_only_transport_ciphertext(self, machines):
        """A packet holds no 16-byte block of the page's plaintext, nor its memory ciphertext."""
        make_source, make_target = machines
        source, target = make_source("sev"), make_target("sev")
        _running_then_paused(source)
        _start(source, target)
        packet = qmp(source, "x-sev-send-update-data", gpa=PROGRAM_GPA & ~(PAGE - 1),
                     length=PAGE)
        data = base64.b64decode(packet["data"])
        assert len(data) == PAGE
        assert len(base64.b64decode(packet["packet-header"])) == 0x34
        plain = source.memory.ram[PROGRAM_GPA & ~(PAGE - 1):][:PAGE]
        blocks = {plain[i:i + 16] for i in range(0, PAGE, 16)} - {bytes(16)}
        assert blocks
        assert not any(block in data for block in blocks)
        assert data != _host_view(source, PROGRAM_GPA & ~(PAGE - 1))

    def test_sev_es_registers_stay_out_of_the_hosts_reach(self, machines):
        """The target hypervisor can neither read nor set the received SEV-ES registers."""
        make_source, make_target = machines
        source, target = make_source("sev-es"), make_target("sev-es")
        _running_then_paused(source)
        _start(source, target)
        packet = qmp(source, "x-sev-send-update-vmsa", vcpu=0)
        vmsa = source.vcpus[0].save_vmsa().pack()
        assert base64.b64decode(packet["data"]) != vmsa
        qmp(target, "x-sev-receive-update-vmsa", vcpu=0, **packet)
        assert target.vcpus[0].save_vmsa().pack() == vmsa
        with pytest.raises(QmpCommandError, match="encrypted VMSA"):
            qmp(target, "x-vcpu-state-export")


class TestRefusals:
    def test_nosend_refuses_send_start_and_the_guest_runs_on(self, machines):
        """Policy NOSEND: SEND_START is the PSP's POLICY_FAILURE; the machine keeps serving."""
        make_source, make_target = machines
        source = make_source("sev", Policy(nodbg=True, nosend=True))
        target = make_target("sev")
        qmp(source, "cont")
        caps = qmp(target, "query-sev-capabilities")
        with pytest.raises(QmpCommandError, match=r"^SEV: SEND_START: POLICY_FAILURE \(0x"):
            qmp(source, "x-sev-send-start", pdh_cert=caps["pdh"], plat_certs=caps["cert-chain"])
        assert qmp(source, "query-sev")["state"] == "running"
        with pytest.raises(QmpCommandError, match="SEND_UPDATE_DATA: INVALID_GUEST_STATE"):
            qmp(source, "x-sev-send-update-data", gpa=0, length=PAGE)
        assert qmp(source, "query-status")["status"] == "running"
        assert source.console.wait_for("B", 1, timeout=30), source.console.text

    def test_a_forged_target_pdh_is_refused(self, machines):
        """SEND_START to a PDH its PEK did not sign (one byte changed): BAD_SIGNATURE."""
        make_source, make_target = machines
        source, target = make_source("sev"), make_target("sev")
        qmp(source, "cont")
        caps = qmp(target, "query-sev-capabilities")
        pdh = bytearray(base64.b64decode(caps["pdh"]))
        pdh[0x420] ^= 0x01  # inside SIG1, the PEK's signature over the body
        with pytest.raises(QmpCommandError, match="SEND_START: BAD_SIGNATURE"):
            qmp(source, "x-sev-send-start", pdh_cert=b64(bytes(pdh)),
                plat_certs=caps["cert-chain"])
        assert qmp(source, "query-sev")["state"] == "running"

    def test_receiving_before_receive_start_is_refused(self, machines):
        """No guest context yet: data, finish and cont are refused; nothing reaches the PSP."""
        _, make_target = machines
        target = make_target("sev")
        for name, arguments in [
            ("x-sev-receive-update-data", {"packet_header": "AA==", "data": "AA==", "gpa": 0}),
            ("x-sev-receive-finish", {}),
            ("x-sev-send-start", {"pdh_cert": "AA==", "plat_certs": "AA=="}),
            ("cont", {}),
        ]:
            with pytest.raises(QmpCommandError, match="SEV: no guest context"):
                qmp(target, name, **arguments)
        assert qmp(target, "query-status")["status"] == "inmigrate"

    @pytest.mark.parametrize("tech", ["sev", "sev-es"])
    def test_cont_before_receive_finish_is_refused(self, machines, tech):
        """Every page and the registers arrived, but no RECEIVE_FINISH: the guest may not run."""
        make_source, make_target = machines
        source, target = make_source(tech), make_target(tech)
        _running_then_paused(source)
        _start(source, target)
        _send_pages(source, target)
        _send_registers(source, target)
        with pytest.raises(QmpCommandError, match=r"INVALID_GUEST_STATE.*RUPDATE"):
            qmp(target, "cont")
        assert qmp(target, "query-status")["status"] == "inmigrate"
        qmp(target, "x-sev-receive-finish")
        qmp(target, "cont")
        assert target.console.wait_for("B", 1, timeout=30), target.console.text

    def test_a_tampered_packet_is_refused_and_writes_nothing(self, machines):
        """One flipped byte of transport data: BAD_MEASUREMENT; the genuine packet then lands."""
        make_source, make_target = machines
        source, target = make_source("sev"), make_target("sev")
        _running_then_paused(source)
        _start(source, target)
        packet = qmp(source, "x-sev-send-update-data", gpa=AB_START, length=PAGE)
        data = bytearray(base64.b64decode(packet["data"]))
        data[100] ^= 0x01
        with pytest.raises(QmpCommandError,
                           match=r"^SEV: RECEIVE_UPDATE_DATA: BAD_MEASUREMENT \(0x"):
            qmp(target, "x-sev-receive-update-data", gpa=AB_START,
                packet_header=packet["packet-header"], data=b64(bytes(data)))
        assert target.memory.ram[AB_START:AB_START + PAGE] == bytes(PAGE)
        qmp(target, "x-sev-receive-update-data", gpa=AB_START, **packet)
        assert target.memory.ram[AB_START:AB_START + PAGE] == source.memory.ram[
            AB_START:AB_START + PAGE]

    def test_the_host_must_stop_the_guest_for_vmsa_and_finish(self, machines):
        """SEND_UPDATE_VMSA and SEND_FINISH of a running guest are refused; data is not."""
        make_source, make_target = machines
        source, target = make_source("sev-es"), make_target("sev-es")
        qmp(source, "cont")
        _start(source, target)
        qmp(source, "x-sev-send-update-data", gpa=0, length=PAGE)
        for name, arguments in [("x-sev-send-update-vmsa", {"vcpu": 0}),
                                ("x-sev-send-finish", {})]:
            with pytest.raises(QmpCommandError, match="needs a stopped guest"):
                qmp(source, name, **arguments)
        qmp(source, "x-sev-send-cancel")
        assert qmp(source, "query-sev")["state"] == "running"

    @pytest.mark.parametrize("count", [0, MAX_BATCH_PAGES + 1])
    def test_page_batches_are_bounded(self, machines, count):
        """A batch of no pages, or of more than a batch, is refused before any PSP command."""
        make_source, _ = machines
        source = make_source("sev")
        with pytest.raises(QmpCommandError, match="a batch is 1 to"):
            qmp(source, "x-sev-send-update-pages", gpas=[0] * count)

    @pytest.mark.parametrize(("gpa", "length"), [(1, PAGE), (0, 100), (0, 0),
                                                 (0, MAX_TRANSFER + PAGE)])
    def test_transfers_are_whole_pages_and_bounded(self, machines, gpa, length):
        """Page-aligned, whole pages, at most 1 MiB a call."""
        make_source, make_target = machines
        source, target = make_source("sev"), make_target("sev")
        qmp(source, "cont")
        _start(source, target)
        with pytest.raises(QmpCommandError, match="whole pages at a page boundary"):
            qmp(source, "x-sev-send-update-data", gpa=gpa, length=length)

    def test_receive_start_checks_the_technology(self, machines):
        """An SEV guest's policy (no ES) is refused by an sev-es target, before the PSP."""
        make_source, make_target = machines
        source, target = make_source("sev"), make_target("sev-es")
        qmp(source, "cont")
        caps = qmp(target, "query-sev-capabilities")
        started = qmp(source, "x-sev-send-start", pdh_cert=caps["pdh"],
                      plat_certs=caps["cert-chain"])
        with pytest.raises(QmpCommandError, match=r"policy 0x1 lacks ES \(bit 2\)"):
            qmp(target, "x-sev-receive-start", **started)
        assert qmp(target, "query-sev")["state"] == "uninit"


class TestCommandLine:
    def test_an_incoming_sev_machine_waits_without_a_guest(self, tmp_path, hosts):
        """``vmmig emu start --incoming --tech sev``: inmigrate, SEV enabled, no guest, its
        own host's PDH, and ``cont`` refused."""
        _, target_dir, _ = hosts

        async def scenario():
            async with machine_process(tmp_path, "--incoming", "--tech", "sev",
                                       "--host-dir", str(target_dir)) as client:
                assert (await client.execute("query-status"))["status"] == "inmigrate"
                info = await client.execute("query-sev")
                assert (info["enabled"], info["state"], info["handle"]) == (True, "uninit", 0)
                return await client.execute("query-sev-capabilities")

        caps = asyncio.run(scenario())
        target_psp = make_psp(target_dir.parent, "host-b")
        assert base64.b64decode(caps["pdh"]) == target_psp.chain.pdh

    def test_an_incoming_sev_machine_takes_no_launch_session(self, tmp_path, hosts, capsys):
        """The owner's DH certificate and session are a launch's: one line, exit status 2."""
        source_dir, _, source_psp = hosts
        argv = ["emu", "start", "--qmp", str(tmp_path / "vm.qmp"), "--incoming",
                "--host-dir", str(source_dir), *Owner(source_psp, "sev").options(tmp_path)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vmmig: error: incoming: an incoming sev machine takes no "
                              "--dh-cert-file, --session-file"), err
        assert err.count("\n") == 1
