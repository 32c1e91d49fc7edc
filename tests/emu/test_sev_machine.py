"""SEV and SEV-ES machines: launch, attestation and secret, and the hardware's rules on memory.

Two kinds of test: machines built in this process, where the guest's own view
of its RAM (``machine.memory.ram``, what the memory controller decrypts for
the vCPUs) can be checked; and ``vmmig emu start`` processes driven over QMP
by the guest owner, who sees only what the hypervisor sees.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import subprocess
import sys
import time

import attrs
import pytest
from psp_support import amd_root, make_psp
from qemu.qmp import ExecuteError, QMPClient
from sev_support import CANARY, MEMORY, MIB, SECRET, Owner, b64, machine_process, qmp

from vmmig.cli import main
from vmmig.errors import ConfigError
from vmmig.guests.ab_check import AB_START, INFO_ADDR, ab_passes, check_ab
from vmmig.guests.emu import PROGRAM_GPA, build_program
from vmmig.platforms.emu.machine import Machine, MachineConfig, launch_chunks_for
from vmmig.platforms.emu.psp import (
    PlatformChain,
    Policy,
    PspCostModel,
    expected_measurement,
    launch_digest,
    verify_chain,
)
from vmmig.platforms.emu.qmp_schema import QmpCommandError
from vmmig.platforms.emu.sev_launch import SECRET_AREA


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """One emulated host's PSP state directory (endorsed by the tests' AMD root) and its PSP."""
    hosts = tmp_path_factory.mktemp("sev-hosts")
    return hosts / "host-a", make_psp(hosts, "host-a")


@pytest.fixture
def machines(tmp_path, host):
    """Builds in-process machines: ``make(tech)`` -> (machine, owner); closes them after."""
    host_dir, psp = host
    made = []

    def make(tech: str, **kwargs):
        owner = Owner(psp, tech) if tech != "plain" else None
        config = (owner.config(host_dir, tmp_path, **kwargs) if owner is not None
                  else MachineConfig(name="vm", memory=MEMORY, run_dir=tmp_path, **kwargs))
        machine = Machine(config)
        made.append(machine)
        return machine, owner

    yield make
    for machine in made:
        machine.close()


class TestLaunch:
    def test_the_psp_cost_model_is_the_configured_one(self, machines):
        """--psp-latency/--psp-rate reach the host's PSP: its modelled time follows them."""
        slow = PspCostModel(latency_per_command_us=1000, bytes_per_second=1e6)
        machine, _ = machines("sev")
        fast_seconds = machine.sev.psp.modelled_seconds
        config = attrs.evolve(machine.config, sev=attrs.evolve(machine.config.sev, cost=slow),
                              name="slow")
        slow_machine = Machine(config)
        try:
            # The launch moves the first MiB: a second at 1 MB/s, against 20 ms at 50 MB/s.
            assert slow_machine.sev.psp.cost == slow
            assert slow_machine.sev.psp.modelled_seconds > 1.0 > 10 * fast_seconds
        finally:
            slow_machine.close()

    @pytest.mark.parametrize("tech", ["sev", "sev-es"])
    def test_the_measurement_covers_image_and_policy(self, machines, host, tech):
        """The owner's expected measurement matches; for another workload it does not."""
        machine, owner = machines(tech)
        blob = base64.b64decode(qmp(machine, "query-sev-launch-measure")["data"])
        assert owner.measurement_ok(blob, machine.config)
        other = MachineConfig(name="vm", memory=MEMORY, vcpus=2, tech=tech, workload="idle")
        assert not owner.measurement_ok(blob, other)

    def test_the_dirtier_launches_the_same_in_every_process(self):
        """The owner's expectation for dirty:RATE holds nothing a process measures (such as
        the TSC's rate): two processes compute the same launch digest."""
        code = ("from vmmig.platforms.emu.machine import MachineConfig, launch_chunks_for\n"
                "from vmmig.platforms.emu.psp import launch_digest\n"
                f"config = MachineConfig(name='vm', memory={MEMORY}, tech='sev', "
                "workload='dirty:64M')\n"
                "print(launch_digest(launch_chunks_for(config)).hex())")
        digests = {subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                  text=True, timeout=60).stdout for _ in range(2)}
        assert len(digests) == 1, digests

    def test_sev_es_measures_every_vcpus_vmsa(self, machines):
        """An SEV-ES launch measures the VMSAs: the digest of the image alone does not match."""
        machine, owner = machines("sev-es")
        measurement = machine.sev.measurement
        image_only = launch_chunks_for(machine.config)[:1]
        assert measurement.measure != expected_measurement(
            tik=owner.session.tik, firmware=owner.psp.firmware, policy=owner.policy,
            launch_digest=launch_digest(image_only), mnonce=measurement.mnonce)

    def test_the_secret_lands_in_guest_memory_as_ciphertext_to_the_host(self, machines):
        """The guest reads the secret at the secret area; the hypervisor reads ciphertext."""
        machine, owner = machines("sev")
        blob = base64.b64decode(qmp(machine, "query-sev-launch-measure")["data"])
        qmp(machine, "sev-inject-launch-secret", **owner.secret_args(blob))
        gpa = SECRET_AREA[0]
        assert machine.memory.ram[gpa:gpa + len(SECRET)] == SECRET
        seen = base64.b64decode(qmp(machine, "x-memory-read", gpa=gpa, size=len(SECRET))["data"])
        assert len(seen) == len(SECRET)
        assert seen != SECRET
        assert SECRET[:16] not in seen

    def test_a_session_for_another_host_is_refused(self, tmp_path, host):
        """LAUNCH_START refuses a session wrapped to another host's PDH: a config error."""
        owner = Owner(make_psp(tmp_path, "host-b"), "sev")
        with pytest.raises(ConfigError, match=r"session-file.*WRAP_MAC"):
            Machine(owner.config(host[0], tmp_path))
        assert not list(tmp_path.glob("vm.*")), "a refused machine left files behind"

    def test_an_sev_es_policy_without_es_is_refused(self, tmp_path, host):
        """The machine refuses a policy that contradicts its technology, naming the ES bit."""
        host_dir, psp = host
        owner = Owner(psp, "sev-es", policy=Policy(nodbg=True))
        with pytest.raises(ConfigError, match=r"policy: 0x1 lacks ES \(bit 2"):
            Machine(owner.config(host_dir, tmp_path))


class TestGuestRuns:
    @pytest.mark.parametrize("tech", ["sev", "sev-es"])
    def test_ab_runs_after_cont(self, machines, tech):
        """In prelaunch nothing runs; cont finishes the launch and the a-b guest makes passes."""
        machine, _ = machines(tech)
        assert qmp(machine, "query-status")["status"] == "prelaunch"
        assert ab_passes(machine.memory.ram) == 0
        qmp(machine, "cont")
        assert qmp(machine, "query-sev")["state"] == "running"
        assert machine.console.wait_for("B", 2, timeout=30), machine.console.text
        qmp(machine, "stop")
        assert ab_passes(machine.memory.ram) >= 2
        assert check_ab(machine.memory.ram).ok

    def test_a_secret_after_the_launch_finished_is_refused(self, machines):
        """Once running (LAUNCH_FINISH), the PSP takes no secret: QEMU's state error."""
        machine, owner = machines("sev")
        blob = base64.b64decode(qmp(machine, "query-sev-launch-measure")["data"])
        qmp(machine, "cont")
        with pytest.raises(QmpCommandError, match=r"Not in correct state. \(LSECRET\) 3"):
            qmp(machine, "sev-inject-launch-secret", **owner.secret_args(blob))


class TestHypervisorAccess:
    @pytest.mark.parametrize(("tech", "lands"), [("plain", True), ("sev", False)])
    def test_a_hypervisor_write_is_garbage_to_an_sev_guest(self, machines, tech, lands):
        """Plain: the guest reads what the host wrote.  SEV: it reads garbage in the touched
        16-byte blocks only, and the host reads back exactly what it wrote."""
        machine, _ = machines(tech)
        gpa = 3 * MIB + 16
        before = machine.memory.ram[gpa - 16:gpa + 64]
        qmp(machine, "x-memory-write", gpa=gpa, data=b64(CANARY))
        guest = machine.memory.ram[gpa:gpa + len(CANARY)]
        assert (guest == CANARY) is lands
        touched = -(-len(CANARY) // 16) * 16
        assert machine.memory.ram[gpa - 16:gpa] == before[:16]
        assert machine.memory.ram[gpa + touched:gpa + 64] == before[16 + touched:]
        read = qmp(machine, "x-memory-read", gpa=gpa, size=len(CANARY))["data"]
        assert base64.b64decode(read) == CANARY

    def test_accesses_are_bounded(self, machines):
        """At most 1 MiB a call, and only inside guest RAM."""
        machine, _ = machines("sev")
        with pytest.raises(QmpCommandError, match="1 to 1048576 bytes"):
            qmp(machine, "x-memory-read", gpa=0, size=MIB + 1)
        with pytest.raises(QmpCommandError, match="not inside guest RAM"):
            qmp(machine, "x-memory-read", gpa=MEMORY - 8, size=16)

    @pytest.mark.parametrize(("tech", "allowed"), [("sev", True), ("sev-es", False)])
    def test_register_access_follows_the_technology(self, machines, tech, allowed):
        """SEV: the hypervisor gets the registers (KVM_GET_REGS); SEV-ES: refused, VMSA sealed."""
        machine, _ = machines(tech)
        if allowed:
            assert len(qmp(machine, "x-vcpu-state-export")) == 2
        else:
            with pytest.raises(QmpCommandError, match="SEV-ES guest's registers are in its "
                               "encrypted VMSA"):
                qmp(machine, "x-vcpu-state-export")
            with pytest.raises(QmpCommandError, match="encrypted VMSA"):
                qmp(machine, "x-vcpu-state-import", vmsas=[])


class TestPlainMachine:
    def test_sev_commands_answer_as_qemu_without_sev(self, machines):
        """query-sev says disabled; the others fail with QEMU's GenericError texts."""
        machine, _ = machines("plain")
        assert qmp(machine, "query-sev") == {"enabled": False, "api-major": 0, "api-minor": 0,
                                             "build-id": 0, "policy": 0, "state": "uninit",
                                             "handle": 0}
        for name, arguments, desc in [
            ("query-sev-launch-measure", {}, "SEV launch measurement is not available"),
            ("query-sev-capabilities", {}, "SEV is not enabled in KVM"),
            ("sev-inject-launch-secret", {"packet_header": "AA==", "secret": "AA=="},
             "SEV not enabled for guest"),
        ]:
            with pytest.raises(QmpCommandError) as info:
                qmp(machine, name, **arguments)
            assert (info.value.error_class, info.value.desc) == ("GenericError", desc)


class TestCommandLine:
    @pytest.mark.parametrize(("tech", "policy", "message"), [
        ("sev-es", "0x1", "vmmig: error: policy: 0x1 lacks ES (bit 2, 0x4)"),
        ("sev", "0x5", "vmmig: error: policy: 0x5 sets ES (bit 2, 0x4)"),
        ("sev", "0x40", "vmmig: error: policy: '0x40' is not a policy word"),
    ])
    def test_a_policy_contradicting_the_technology_is_refused(self, tmp_path, host, capsys,
                                                              tech, policy, message):
        """One line on stderr, exit status 2, before any machine exists."""
        owner = Owner(host[1], "sev")
        argv = ["emu", "start", "--qmp", str(tmp_path / "vm.qmp"), "--host-dir", str(host[0]),
                *owner.options(tmp_path), "--tech", tech, "--policy", policy]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(message), err
        assert err.count("\n") == 1

    @pytest.mark.parametrize(("args", "message"), [
        (["--tech", "sev", "--host-dir", "h"], "--dh-cert-file is required for --tech sev"),
        (["--policy", "1"], "only sev and sev-es machines take --policy"),
    ])
    def test_missing_or_misplaced_sev_options_are_refused(self, tmp_path, capsys, args,
                                                          message):
        """SEV needs the owner's launch inputs; a plain machine takes none."""
        argv = ["emu", "start", "--qmp", str(tmp_path / "vm.qmp"), *args]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1


async def _until_changes(client: QMPClient, gpa: int, size: int, first: str) -> str:
    """Read guest memory over QMP until it differs from ``first`` (bounded)."""
    deadline = time.monotonic() + 30
    while (now := (await client.execute("x-memory-read", {"gpa": gpa, "size": size}))["data"]) \
            == first:
        assert time.monotonic() < deadline, "guest memory did not change"
        await asyncio.sleep(0.01)
    return now


class TestOverQmp:
    def test_the_owner_attests_injects_and_the_guest_runs(self, tmp_path, host):
        """The owner's whole launch over QMP: capabilities, measurement, secret, cont."""
        host_dir, psp = host
        owner = Owner(psp, "sev")
        launched = owner.config(host_dir, tmp_path)

        async def scenario():
            async with machine_process(tmp_path, "--host-dir", str(host_dir),
                                       *owner.options(tmp_path)) as client:
                assert (await client.execute("query-status"))["status"] == "prelaunch"
                info = await client.execute("query-sev")
                assert info["enabled"]
                assert info["state"] == "launch-secret"
                assert (info["policy"], info["api-major"], info["api-minor"]) == (1, 1, 55)
                caps = await client.execute("query-sev-capabilities")
                chain = PlatformChain.from_buffers(
                    base64.b64decode(caps["pdh"]), base64.b64decode(caps["cert-chain"]),
                    amd_root().ask_cert + amd_root().ark_cert)
                assert verify_chain(chain, amd_root().ark_public_key).cert == psp.chain.pdh
                assert (caps["cbitpos"], len(base64.b64decode(caps["cpu0-id"]))) == (47, 64)

                blob = base64.b64decode(
                    (await client.execute("query-sev-launch-measure"))["data"])
                assert owner.measurement_ok(blob, launched)
                bad = owner.secret_args(blob)
                header = bytearray(base64.b64decode(bad["packet-header"]))
                header[-1] ^= 1
                with pytest.raises(ExecuteError, match="BAD_MEASUREMENT"):
                    await client.execute("sev-inject-launch-secret",
                                         {**bad, "packet-header": b64(header)})
                assert (await client.execute("query-sev"))["state"] == "launch-secret"
                await client.execute("sev-inject-launch-secret", owner.secret_args(blob))
                secret_area = await client.execute(
                    "x-memory-read", {"gpa": SECRET_AREA[0], "size": len(SECRET)})
                assert SECRET[:16] not in base64.b64decode(secret_area["data"])

                block = (await client.execute("x-memory-read",
                                              {"gpa": INFO_ADDR, "size": 16}))["data"]
                with client.listener("RESUME") as events:
                    await client.execute("cont")
                    await asyncio.wait_for(events.get(), 10)
                assert (await client.execute("query-sev"))["state"] == "running"
                # The pass counter moves: its ciphertext changes, the guest runs.
                await _until_changes(client, INFO_ADDR, 16, block)

        asyncio.run(scenario())

    @pytest.mark.parametrize("tech", ["plain", "sev"])
    def test_hypervisor_reads_show_the_guests_plaintext_only_without_sev(self, tmp_path, host,
                                                                         tech):
        """The program, its block and the a-b pages the guest wrote: plaintext to the
        hypervisor on a plain machine, never on an SEV one."""
        host_dir, psp = host
        options = ([] if tech == "plain"
                   else ["--host-dir", str(host_dir), *Owner(psp, tech).options(tmp_path)])
        program = build_program("ab64")[:32]
        block = struct.pack("<II", AB_START, MEMORY)

        async def scenario():
            async with machine_process(tmp_path, *options) as client:
                memory = await client.execute("x-query-memory")
                assert (memory["ram-path"] is None) is memory["encrypted"] is (tech == "sev")
                pages = (await client.execute("x-memory-read",
                                              {"gpa": AB_START, "size": 16 * 4096}))["data"]
                await client.execute("cont")
                pages = base64.b64decode(await _until_changes(client, AB_START, 16 * 4096,
                                                              pages))
                low = base64.b64decode((await client.execute(
                    "x-memory-read", {"gpa": 0, "size": AB_START}))["data"])
                return pages, low

        pages, low = asyncio.run(scenario())
        zero_blocks = sum(pages[i:i + 16] == bytes(16) for i in range(0, len(pages), 16))
        if tech == "plain":
            assert low[PROGRAM_GPA:PROGRAM_GPA + 32] == program
            assert low[INFO_ADDR:INFO_ADDR + 8] == block
            assert zero_blocks >= len(pages) // 16 - 16  # all but each page's first block
        else:
            assert program not in low
            assert block not in low
            assert zero_blocks == 0
