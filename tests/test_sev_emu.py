"""``vmmig run --tech sev`` on the emulated platform: as a user runs it, and against a
hostile host.

Every VM is launched through the guest owner (kept in a test directory, so
that two runs share the guest's master secret); the agents move only what
the Migration Handlers seal.  The hostile host is a proxy between the
agents (:mod:`hostile_proxy`) that attacks the sealed records and hides its
tracks from the channel's own framing: only the MHs can notice.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hostile_proxy import HostileProxy, proxied_platform
from migration_support import SourceWatch, migrate_in_process, no_leftover_processes
from vmmig import hookimpl
from vmmig.config import load_plan
from vmmig.core.phases import Phase


VMMIG = [sys.executable, "-m", "vmmig"]
MEMORY = "64M"
#: A migrated regs guest's own verdict on its register chain, as the report words it.
CHAIN_VERDICT = ("the guest's own check: the register chain runs on unbroken across the "
                 "migration")
#: What each attack on the sealed records is refused as, by the target's MH.
REFUSALS = {"flip": "AUTH_FAILED", "drop": "OUT_OF_ORDER", "replay": "REPLAY",
            "swap": "AUTH_FAILED", "truncate": "MISMATCH", "splice": "AUTH_FAILED"}


@pytest.fixture
def no_leftovers():
    """Fails the test if a machine or agent process it started outlives it."""
    with no_leftover_processes(b"emu"), no_leftover_processes(b"agent"):
        yield


def run_cli(tmp_path: Path, *args: str, tech: str = "sev"):
    """``vmmig run --tech TECH --platform emu ...``; the process result and the JSON report."""
    report_path = tmp_path / "report.json"
    result = subprocess.run([*VMMIG, "run", "--tech", tech, "--platform", "emu",
                             "--owner", str(tmp_path / "owner"), "--json", str(report_path),
                             *args], capture_output=True, text=True, timeout=300, check=False)
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return result, report


def sev_plan(tmp_path: Path, **fields: object):
    return load_plan(None, {"tech": "sev", "platform": "emu", "memory": MEMORY,
                            "owner": str(tmp_path / "owner"), **fields})


def master_secret(owner: Path) -> bytes:
    """The guest's migration master secret, as the owner keeps it (the test is the tenant)."""
    return base64.b64decode(json.loads((owner / "secrets" / "guest.json").read_text())["secret"])


class TestLiveMigration:
    @pytest.mark.parametrize("workload", ["ab", "dirty:16M", "regs"])
    def test_a_guest_moves_live_attested_and_checked_by_its_mhs(self, tmp_path, workload,
                                                                 no_leftovers):
        """Both VMs attested, memory checked by the target MH against the sealed
        manifest, registers equal, the source retired, the guest writing on the target."""
        result, report = run_cli(tmp_path, "--memory", MEMORY, "--workload", workload)
        assert result.returncode == 0, result.stderr
        assert report["status"] == "completed"
        assert report["source-vm"] == "retired"
        checks = report["integrity-details"]["checks"]
        assert checks["attestation"].startswith("source: boot launch on host-a: measurement ")
        assert "target: migration-target launch on host-b" in checks["attestation"]
        assert checks["memory"].startswith("the target's MH verified")
        assert checks["vcpu-state"] == "registers of all 1 vCPUs equal on both sides"
        assert checks["source-retired"] == "the target's receipt retired the source's MH"
        assert checks["guest-running"].startswith("guest running, writing its memory")
        if workload == "ab":
            assert checks["a-b"] == ("the guest's own check passed on every page, 2 passes "
                                     "after resume")
        if workload == "regs":
            assert checks["register-chain"] == CHAIN_VERDICT
        assert report["ram"]["duplicate"] == 0, "the host learnt which pages are zero"
        assert report["ram"]["transferred"] >= 15 << 20
        assert "attestation" in result.stdout
        assert "guest-running" in result.stdout

    def test_the_readme_command(self, tmp_path, no_leftovers):
        """The README's main job as a user types it (no --platform: sev-es means emu):
        SEV-ES, 1 GiB, 4 vCPUs, the a-b guest, auto-converge."""
        report_path = tmp_path / "report.json"
        result = subprocess.run([*VMMIG, "run", "--tech", "sev-es", "--memory", "1G",
                                 "--vcpus", "4", "--workload", "ab", "--auto-converge",
                                 "--json", str(report_path)],
                                capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
        report = json.loads(report_path.read_text())
        assert (report["status"], report["platform"], report["integrity"]) == (
            "completed", "emu", "ok")
        checks = report["integrity-details"]["checks"]
        assert checks["vcpu-state"].startswith("the states of all 4 vCPUs sealed")
        assert checks["a-b"].startswith("the guest's own check passed on every page")
        assert report["ram"]["dirty-sync-count"] >= 2, "not a live, multi-pass migration"

    @pytest.mark.parametrize("workload", ["ab", "regs"])
    def test_an_sev_es_guest_moves_with_its_cpu_state_sealed_by_the_mhs(
            self, tmp_path, workload, no_leftovers):
        """SEV-ES, 2 vCPUs: the hypervisor never touches a register; the MHs move every
        vCPU's state, and the guest goes on on the target from the exact instruction."""
        result, report = run_cli(tmp_path, "--memory", MEMORY, "--vcpus", "2", "--workload",
                                 workload, tech="sev-es")
        assert result.returncode == 0, result.stderr
        assert report["status"] == "completed"
        checks = report["integrity-details"]["checks"]
        assert "policy 0x5" in checks["attestation"]
        assert checks["vcpu-state"] == (
            "the states of all 2 vCPUs sealed by the source MH and checked against its "
            "manifest by the target MH; the hypervisor never read or set a register")
        assert checks["guest-running"].startswith("guest running, writing its memory")
        if workload == "ab":
            assert checks["a-b"].startswith("the guest's own check passed on every page")
        else:
            assert checks["register-chain"] == CHAIN_VERDICT
        parts = report["downtime-parts"]
        assert set(parts) == {"memory", "cpu-state", "commit"}
        assert sum(parts.values()) == report["downtime"]
        assert "cpu-state" in result.stdout  # the summary's downtime line shows the parts

    def test_the_psp_strategy_moves_the_guest_through_both_psps(self, tmp_path, no_leftovers):
        """--strategy psp: SEND_START/RECEIVE_START, a packet per page, SEND/RECEIVE_FINISH;
        the report says memory is not checked end to end on that path."""
        result, report = run_cli(tmp_path, "--memory", "16M", "--workload", "dirty:1M",
                                 "--strategy", "psp")
        assert result.returncode == 0, result.stderr
        assert report["status"] == "completed"
        checks = report["integrity-details"]["checks"]
        assert checks["attestation"].endswith("target: keys from the source PSP's SEND_START")
        assert checks["page-packets"].endswith("the PSP path has no digest of all memory")
        assert checks["vcpu-state"] == "registers of all 1 vCPUs equal on both sides"
        assert checks["guest-running"].startswith("guest running, writing its memory")
        assert report["ram"]["duplicate"] == 0, "the host learnt which pages are zero"
        assert report["ram"]["normal"] >= 3 << 10  # most of 4096 (never-touched ones may wait)
        assert report["source-vm"] == "retired"

    def test_an_owner_without_the_guests_expectations_refuses_and_nothing_runs(
            self, tmp_path, no_leftovers):
        """A served owner that was never told about the guest gives no secret."""
        owner = tmp_path / "served"
        subprocess.run([*VMMIG, "owner", "expect", "--state", str(owner), "--guest", "other",
                        "--tech", "sev", "--memory", MEMORY, "--amd-root",
                        str(_amd_root())], check=True, capture_output=True, timeout=120)
        with subprocess.Popen([*VMMIG, "owner", "serve", "--state", str(owner), "--listen",
                               f"unix:{tmp_path / 'owner.sock'}"], stderr=subprocess.PIPE,
                              text=True) as server:
            try:
                assert "serving" in server.stderr.readline()
                result, _ = run_cli(tmp_path, "--memory", MEMORY,
                                    "--owner", f"unix:{tmp_path / 'owner.sock'}")
            finally:
                server.terminate()
        assert result.returncode == 1
        assert "unknown-guest" in result.stderr
        assert "Traceback" not in result.stderr


def _amd_root() -> Path:
    from vmmig.platforms.emu.sev_hosts import default_amd_root  # noqa: PLC0415

    return default_amd_root()


def run_attacked(tmp_path: Path, attack: str | None, spliced: bytes | None = None, *,
                 tech: str = "sev"):
    """One in-process run through a hostile proxy; (report, source check, proxy, after)."""
    proxies: list[HostileProxy] = []

    def make(target: str) -> HostileProxy:
        proxies.append(HostileProxy(target, attack, spliced=spliced))
        return proxies[-1]

    after: dict[str, object] = {}
    plan = sev_plan(tmp_path, workload="ab", tech=tech, vcpus=2)
    try:
        report, source = migrate_in_process(plan, SourceWatch(), proxied_platform(make), after)
    finally:
        for proxy in proxies:
            proxy.close()
    return report, source, proxies[0], after


def assert_refused_and_source_runs(report, source, refusal: str) -> None:
    """The attack ended the migration with the target MH's ``refusal`` before the
    target ever ran; the source guest runs on where it was."""
    assert report.status == "failed"
    assert refusal in report.error, report.error
    assert Phase.FINALIZING.value not in report.extra["phase-history"]
    assert report.source == "running"
    assert source is not None
    assert source[0], source


class TestHostileHost:
    @pytest.mark.parametrize("attack", ["flip", "drop", "replay", "swap", "truncate"])
    def test_an_attacked_record_stops_the_migration_and_the_source_runs_on(
            self, tmp_path, attack, no_leftovers):
        """The target MH refuses; the target never runs; the source MH drops its session
        and the source guest keeps running where it was."""
        report, source, proxy, after = run_attacked(tmp_path, attack)
        assert proxy.attacked
        assert_refused_and_source_runs(report, source, REFUSALS[attack])
        assert after["source-mh"]["role"] is None, after["source-mh"]

    def test_a_record_spliced_in_from_another_migration_is_refused(self, tmp_path,
                                                                    no_leftovers):
        """Two migrations of the same guest (one owner, one master secret): a record of
        the first one put into the second is another session's."""
        first, _, recorder, _ = run_attacked(tmp_path, None)
        assert first.status == "completed"
        report, source, proxy, _ = run_attacked(tmp_path, "splice", spliced=recorder.pages[2])
        assert proxy.attacked
        assert_refused_and_source_runs(report, source, "AUTH_FAILED")


class TestHostileHostSevEs:
    @pytest.mark.parametrize(("attack", "refusal"), [
        ("cpu-flip", "AUTH_FAILED"), ("cpu-replay", "REPLAY"), ("cpu-swap", "OUT_OF_ORDER"),
        ("cpu-drop", "MISMATCH")])
    def test_an_attacked_vcpu_state_stops_the_migration(self, tmp_path, attack, refusal,
                                                        no_leftovers):
        """A vCPU's state altered in transit, replayed, two swapped, the last one missing:
        the target MH refuses before any register reaches a vCPU, the target never runs,
        the source resumes from its saved state."""
        report, source, proxy, after = run_attacked(tmp_path, attack, tech="sev-es")
        assert proxy.attacked
        assert_refused_and_source_runs(report, source, refusal)
        assert after["source-mh"]["role"] is None, after["source-mh"]

    def test_a_vcpu_state_from_another_migration_is_refused(self, tmp_path, no_leftovers):
        first, _, recorder, _ = run_attacked(tmp_path, None, tech="sev-es")
        assert first.status == "completed"
        report, source, proxy, _ = run_attacked(tmp_path, "cpu-splice", tech="sev-es",
                                                spliced=recorder.cpu_states[0])
        assert proxy.attacked
        assert_refused_and_source_runs(report, source, "AUTH_FAILED")


class _AgentMemory:
    """Reads both agents' whole memory once all pages are sent (they live until then)."""

    def __init__(self) -> None:
        self.images: dict[str, bytes] = {}

    @hookimpl
    def vmmig_phase_changed(self, migration, old, new):
        if new is Phase.TRANSFERRING_CPU_STATE:
            for role in ("source", "target"):
                self.images[role] = _process_memory(migration.scratch[f"{role}-agent"].pid)


def _process_memory(pid: int) -> bytes:
    """Every readable mapping of a process, concatenated."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunks.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(chunks)


#: Where a plain guest gets its canary: inside an a-b page, past the byte it increments.
CANARY_AT = (2 << 20) + 64


def _planting(platform: type, canary: bytes) -> type:
    """``platform`` whose (plain) source guest gets ``canary`` written into its RAM."""

    class Planting(platform):  # type: ignore[misc, valid-type]
        async def launch_source(self):
            machine = await super().launch_source()
            with machine.ram_path.open("r+b") as ram:
                ram.seek(CANARY_AT)
                ram.write(canary)
            return machine

    return Planting


class TestConfidentiality:
    @pytest.mark.parametrize("tech", ["plain", "sev", "sev-es"])
    def test_canary_bytes_in_guest_memory_reach_a_plain_host_only(self, tmp_path, tech,
                                                                 no_leftovers):
        """Secret bytes in guest memory: with ``plain`` the agents hold them and the channel
        carries them (the check can fail); with ``sev`` neither does.  The canary is the
        guest's own master secret, which only the owner and the guest ever held; a plain
        guest gets random bytes written into its RAM.  (Registers: on SEV-ES they cross
        only sealed, tests/emu/test_mh_machine.py.)"""
        memory = _AgentMemory()
        proxies: list[HostileProxy] = []

        def make(target: str) -> HostileProxy:
            proxies.append(HostileProxy(target))
            return proxies[-1]

        canary = os.urandom(32)
        platform = proxied_platform(make)
        if tech == "plain":
            platform = _planting(platform, canary)
        try:
            report, _ = migrate_in_process(sev_plan(tmp_path, tech=tech, workload="ab"),
                                           SourceWatch(), platform, plugins=[memory])
        finally:
            for proxy in proxies:
                proxy.close()
        assert report.status == "completed", report.error
        if tech != "plain":
            canary = master_secret(tmp_path / "owner")
        found = {"channel": canary in proxies[0].recorded,
                 **{f"{role} agent": canary in image for role, image in memory.images.items()}}
        expected = tech == "plain"
        assert found == {"channel": expected, "source agent": expected,
                         "target agent": expected}


def kill(role):
    """A progress action that SIGKILLs the machine or agent of ``role``."""
    def act(migration, _progress):
        process = {"target machine": migration.target,
                   "source agent": migration.scratch.get("source-agent"),
                   "target agent": migration.scratch.get("target-agent")}[role]
        os.kill(process.pid, signal.SIGKILL)
    return act


class TestFaults:
    @pytest.mark.parametrize("role", ["target machine", "target agent", "source agent"])
    def test_a_killed_process_leaves_the_source_running_with_its_mh_idle(
            self, tmp_path, role, no_leftovers):
        """Killed mid-transfer: rolled back; the source guest runs on, and its MH has no
        session left (a later migration may start)."""
        after: dict[str, object] = {}
        report, source = migrate_in_process(
            sev_plan(tmp_path, workload="ab", memory="128M", **{"downtime-limit": 1}),
            SourceWatch(on_progress=kill(role)), after=after)
        assert report.status == "failed"
        assert report.extra["phase-history"][-2:] == ["failing", "rolled-back"]
        assert report.source == "running"
        assert source is not None
        assert source[0], source
        assert after["source-mh"]["role"] is None, after["source-mh"]
