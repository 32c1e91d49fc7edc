"""The PSP page path in the precopy engine: an SEV guest moved live through both PSPs.

In-process SEV machines on two emulated hosts, the engine's two loops in two
threads over a socket pair, the machines driven through their QMP command
handlers (as the agents drive them over the socket).
"""

from __future__ import annotations

import socket
import threading

import pytest
from psp_support import make_psp
from qemu.qmp import QMPError
from sev_support import MEMORY, POLICIES, Owner, qmp

from vmmig.agents.engine import run_source, run_target
from vmmig.agents.psp_pages import PspSourcePages, PspTargetPages
from vmmig.channel import Channel
from vmmig.core.precopy import PrecopyLimits
from vmmig.errors import MigrationFailed
from vmmig.guests.ab_check import ab_passes, check_ab
from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.qmp_schema import QmpCommandError
from vmmig.platforms.emu.sev_launch import SevConfig


class LocalMonitor:
    """A machine's QMP commands called in this process, with the agents' client's errors."""

    def __init__(self, machine: Machine, *, tamper: bool = False) -> None:
        self.machine = machine
        self.tamper = tamper

    def cmd(self, name: str, **arguments: object) -> object:
        if self.tamper and name == "x-sev-receive-update-pages":
            packet = arguments["packets"][0]  # type: ignore[index]
            packet["data"] = ("B" if packet["data"][0] != "B" else "C") + packet["data"][1:]
        try:
            return qmp(self.machine, name, **arguments)
        except QmpCommandError as err:
            raise QMPError(f"{name}: {err}") from None


@pytest.fixture
def pair(tmp_path_factory, tmp_path):
    """A running SEV a-b source on host A and an incoming SEV target on host B."""
    where = tmp_path_factory.mktemp("psp-path-hosts")
    source_psp = make_psp(where, "host-a")
    make_psp(where, "host-b")
    source = Machine(Owner(source_psp, "sev").config(where / "host-a", tmp_path, name="source"))
    target = Machine(MachineConfig(name="target", memory=MEMORY, vcpus=2, tech="sev",
                                   incoming=True, run_dir=tmp_path,
                                   sev=SevConfig(POLICIES["sev"], b"", b"", where / "host-b")))
    qmp(source, "cont")
    assert source.console.wait_for("B", 1, timeout=30), source.console.text
    caps = qmp(target, "query-sev-capabilities")
    qmp(target, "x-sev-receive-start", **qmp(source, "x-sev-send-start", pdh_cert=caps["pdh"],
                                              plat_certs=caps["cert-chain"]))
    yield source, target
    source.close()
    target.close()


def migrate(source: Machine, target: Machine, *, tamper: bool = False):
    left, right = socket.socketpair()
    outcome: dict[str, object] = {}

    def receive() -> None:
        monitor = LocalMonitor(target, tamper=tamper)
        try:
            with Channel(right) as channel:
                outcome["pages"] = run_target(monitor, channel, PspTargetPages(monitor))
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=receive)
    thread.start()
    monitor = LocalMonitor(source)
    try:
        with Channel(left) as channel:
            result = run_source(monitor, channel, PrecopyLimits(downtime_limit=0.3, max_rounds=3),
                                pages=PspSourcePages(monitor))
    finally:
        thread.join(60)
    return result, outcome


class TestPspPagePath:
    def test_a_running_sev_guest_moves_live_through_both_psps(self, pair):
        """Rounds of per-page PSP packets while the guest runs, then stop-and-copy and the
        registers: the target's RAM equals the source's, and the guest runs on there."""
        source, target = pair
        result, outcome = migrate(source, target)
        assert "error" not in outcome, outcome
        assert result.zero == 0, "the PSP path must not reveal zero pages"
        assert result.normal >= MEMORY // 4096
        qmp(source, "x-sev-send-finish")
        qmp(target, "x-sev-receive-finish")
        assert bytes(target.memory.ram) == bytes(source.memory.ram)
        assert check_ab(target.memory.ram).ok
        passes = ab_passes(target.memory.ram)
        qmp(target, "cont")
        assert target.console.wait_for("B", 1, timeout=30), target.console.text
        qmp(target, "stop")
        assert ab_passes(target.memory.ram) > passes

    def test_a_tampered_packet_stops_the_migration(self, pair):
        """A bit changed in transit: the target PSP refuses it, the source learns why."""
        source, target = pair
        with pytest.raises(MigrationFailed, match="target PSP refused a packet"):
            migrate(source, target, tamper=True)
        # The source was still running when the target refused: it runs on.
        assert qmp(target, "query-status")["status"] == "inmigrate"
