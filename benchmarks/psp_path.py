"""Page rate of the PSP's own migration path between two in-process SEV machines.

A launched SEV (or SEV-ES) source on one emulated host and an ``--incoming``
target on another exchange SEND_START/RECEIVE_START, then every page of guest
RAM goes ``x-sev-send-update-data`` -> ``x-sev-receive-update-data`` through
the machines' QMP command handlers (argument checking and base64 included,
the socket not), ``--chunk`` bytes a call.  KVM's SEND_UPDATE_DATA moves at
most one page a call, so ``4K`` is the real hypervisor's pattern; ``1M`` is
the most one of our commands takes.

Two figures per run:

- wall: what this emulator costs on this machine (AES-CTR, HMAC-SHA256 and
  base64 in Python's C libraries); not a statement about a real PSP.
- modelled: ``Psp.modelled_seconds`` of the source and target PSPs over the
  transfer, from :class:`~vmmig.platforms.emu.psp.PspCostModel`, whose
  defaults (15 us a command, 50 MB/s) are ASSUMPTIONS: no published figure
  for a PSP's SEND/RECEIVE_UPDATE_DATA rate exists (see psp/cost.py and the
  research notes, section 4).  The two PSPs are separate chips, so a
  pipelined migration takes about the larger of the two; a strictly
  alternating one their sum.  Both are printed.

    .venv/bin/python benchmarks/psp_path.py --memory 64M --chunk 4K --chunk 1M
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vmmig.config import parse_size
from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.psp import (
    EmulatedAmdRoot,
    Policy,
    PspCostModel,
    build_launch_session,
    verify_chain,
)
from vmmig.platforms.emu.sev_launch import SevConfig, host_psp


def qmp(machine: Machine, name: str, arguments: dict[str, object]) -> dict[str, object]:
    """Run a QMP command's handler as the server does (arguments checked first)."""
    command = machine.commands.get(name)
    assert command is not None, name
    result = command.handler(**command.bind(arguments))
    return result if isinstance(result, dict) else {}


def machines(work: Path, tech: str, memory: int, cost: PspCostModel) -> tuple[Machine, Machine]:
    """A launched, paused source on host-a and an incoming target on host-b."""
    root_dir = work / "amd-root"
    root_dir.mkdir()
    root = EmulatedAmdRoot.load_or_create(root_dir)
    policy = Policy(nodbg=True, es=tech == "sev-es")
    source_psp = host_psp(work / "host-a", root_dir)
    host_psp(work / "host-b", root_dir)
    session = build_launch_session(verify_chain(source_psp.chain, root.ark_public_key), policy)
    source = Machine(MachineConfig(
        name="source", memory=memory, tech=tech, workload="idle", run_dir=work,
        sev=SevConfig(policy, session.dh_cert, session.session, work / "host-a", cost=cost)))
    target = Machine(MachineConfig(
        name="target", memory=memory, tech=tech, incoming=True, run_dir=work,
        sev=SevConfig(policy, b"", b"", work / "host-b", cost=cost)))
    qmp(source, "cont", {})  # LAUNCH_FINISH
    qmp(source, "stop", {})
    return source, target


def run(tech: str, memory: int, chunk: int, cost: PspCostModel) -> str:
    """One migration of every page; the result line."""
    with tempfile.TemporaryDirectory() as work:
        source, target = machines(Path(work), tech, memory, cost)
        try:
            caps = qmp(target, "query-sev-capabilities", {})
            started = qmp(source, "x-sev-send-start",
                          {"pdh-cert": caps["pdh"], "plat-certs": caps["cert-chain"]})
            qmp(target, "x-sev-receive-start", started)
            assert source.sev is not None
            assert target.sev is not None
            source_before = source.sev.psp.modelled_seconds
            target_before = target.sev.psp.modelled_seconds
            began = time.perf_counter()
            for gpa in range(0, memory, chunk):
                packet = qmp(source, "x-sev-send-update-data", {"gpa": gpa, "length": chunk})
                qmp(target, "x-sev-receive-update-data", {**packet, "gpa": gpa})
            wall = time.perf_counter() - began
            sent = source.sev.psp.modelled_seconds - source_before
            received = target.sev.psp.modelled_seconds - target_before
            assert bytes(source.memory.ram) == bytes(target.memory.ram)
        finally:
            source.close()
            target.close()
    pages = memory // 4096
    modelled = max(sent, received)
    return (f"{tech} {memory >> 20} MiB, {chunk >> 10} KiB/call: "
            f"wall {wall:.3f} s = {pages / wall:,.0f} pages/s, {memory / wall / 1e6:.1f} MB/s; "
            f"modelled source {sent:.3f} s, target {received:.3f} s -> pipelined "
            f"{pages / modelled:,.0f} pages/s, {memory / modelled / 1e6:.1f} MB/s "
            f"(alternating {memory / (sent + received) / 1e6:.1f} MB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="64M")
    parser.add_argument("--tech", choices=("sev", "sev-es"), default="sev")
    parser.add_argument("--chunk", action="append", help="bytes a call (repeatable; 4K, 1M)")
    parser.add_argument("--psp-latency", type=float, default=PspCostModel().latency_per_command_us,
                        help="modelled microseconds a command (an assumption)")
    parser.add_argument("--psp-rate", type=float, default=PspCostModel().bytes_per_second,
                        help="modelled bytes a second (an assumption)")
    args = parser.parse_args()
    cost = PspCostModel(args.psp_latency, args.psp_rate)
    print(f"cost model (assumed): {cost.latency_per_command_us:g} us/command, "
          f"{cost.bytes_per_second / 1e6:g} MB/s")
    for chunk in args.chunk or ["4K", "1M"]:
        print(run(args.tech, parse_size(args.memory), parse_size(chunk), cost), flush=True)


if __name__ == "__main__":
    main()
