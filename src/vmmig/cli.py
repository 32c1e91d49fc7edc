"""The ``vmmig`` command line: ``run`` and ``plugins``.

Errors are printed as one line (``vmmig: error: ...``), never a traceback.
Exit status: 0 completed, 1 failed, 2 bad plan or usage, 130 cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmmig import __version__
from vmmig.config import MigrationPlan, load_plan, plan_fields, precopy_limits
from vmmig.errors import ConfigError, MigrationCancelled, VmmigError
from vmmig.integrity import human_size
from vmmig.owner.command import add_owner_parser, run_owner_command
from vmmig.plugin_host import PluginHost
from vmmig.report import MigrationReport
from vmmig.runner import run_migration


__all__ = ["main", "summary"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
#: Plan fields an agent takes as options: the source's precopy limits.
_AGENT_LIMITS = ("downtime-limit", "bandwidth", "auto-converge")
#: Plan fields ``emu start`` takes as options: the PSP's cost model.
_PSP_COST = ("psp-latency", "psp-rate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # noqa: ANN401 (argparse's own signature)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmmig", description="Live-migrate (confidential) virtual machines.")
    parser.add_argument("--version", action="version", version=f"vmmig {__version__}")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="do not load this plugin (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="start a test VM and live-migrate it")
    run.add_argument("--config", type=Path, metavar="PLAN.toml",
                     help="migration plan; options given here override it")
    _add_plan_options(run)

    sub.add_parser("plugins", help="list plugins, their technologies and hooks")

    emu = sub.add_parser("emu", help="the emulated confidential platform")
    emu_sub = emu.add_subparsers(dest="emu_command", required=True, parser_class=_Parser)
    start = emu_sub.add_parser("start", help="start one emulated machine and serve QMP")
    start.add_argument("--name", default="vm", help="names the machine's files")
    start.add_argument("-m", "--memory", default="1G", metavar="SIZE", help="guest RAM")
    start.add_argument("--smp", "--vcpus", dest="vcpus", default="1", metavar="N")
    start.add_argument("--tech", default="plain", help="plain, sev or sev-es")
    start.add_argument("--workload", default="ab",
                       help="ab, fill, idle, regs or dirty:RATE[:random]")
    start.add_argument("--qmp", required=True, metavar="PATH", help="QMP socket to create")
    start.add_argument("--run-dir", metavar="DIR", help="where RAM and dirty-page files go "
                       "(default: the QMP socket's directory)")
    start.add_argument("--incoming", action="store_true", help="start as a migration target")
    start.add_argument("-S", dest="paused", action="store_true", help="do not start the vCPUs")
    sev = start.add_argument_group("SEV and SEV-ES launch (QEMU's sev-guest object)")
    sev.add_argument("--policy", metavar="WORD",
                     help="guest policy, e.g. 0x1 (default: 0x1 NODBG for sev, 0x5 for sev-es)")
    sev.add_argument("--dh-cert-file", metavar="FILE",
                     help="the owner's DH certificate (PDH format), base64")
    sev.add_argument("--session-file", metavar="FILE", help="the owner's launch session, base64")
    sev.add_argument("--host-dir", metavar="DIR",
                     help="the emulated host's PSP state, shared by its machines")
    sev.add_argument("--amd-root", metavar="DIR",
                     help="the emulated AMD root, shared by the hosts (default: --host-dir)")
    _add_plan_options(sev, _PSP_COST)
    mh = start.add_argument_group("the Migration Handler (sev and sev-es)")
    mh.add_argument("--firmware", metavar="PATH",
                    help="the MH firmware image to load (default: the built-in one)")
    mh.add_argument("--mh-queues", type=int, default=1, metavar="N",
                    help="mailbox queues, one per helper vCPU (1 to 4)")
    mh.add_argument("--mh-target", action="store_true",
                    help="with --incoming: launch through the owner with the MH only, "
                         "to receive a guest from a source's MH")

    agent = sub.add_parser("agent", help="one side of a migration's data path (run by vmmig)")
    agent.add_argument("role", choices=("source", "target"))
    agent.add_argument("--qmp", required=True, metavar="PATH", help="the machine's QMP socket")
    agent.add_argument("--address", required=True, metavar="URI",
                       help="target: where to listen; source: where to connect "
                            "(tcp:HOST:PORT or unix:PATH)")
    agent.add_argument("--page-path", choices=("plain", "mh", "psp"), default="plain",
                       help="plain: the agents map guest RAM; mh: the guests' Migration "
                            "Handlers seal and open the pages; psp: the machines' PSPs do "
                            "(both agents)")
    _add_plan_options(agent, _AGENT_LIMITS)
    add_owner_parser(sub)
    return parser


def _add_plan_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      names: Sequence[str] | None = None) -> None:
    """One option per plan field (those in ``names`` only, if given), unset by default."""
    for field in plan_fields():
        if names is not None and field.name not in names:
            continue
        if field.flag:
            parser.add_argument(f"--{field.name}", dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=field.help)
        else:
            parser.add_argument(f"--{field.name}", dest=field.name, default=None,
                                metavar=field.metavar, help=field.help)


def _plan_options(args: argparse.Namespace, names: Sequence[str] | None = None
                  ) -> dict[str, object]:
    """The plan options given on the command line."""
    return {field.name: getattr(args, field.name) for field in plan_fields()
            if (names is None or field.name in names) and getattr(args, field.name) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vmmig`` script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="vmmig: %(name)s: %(message)s")
    if not args.verbose:
        # qemu.qmp logs a killed QEMU's dropped connection as an error; vmmig
        # reports that itself, in one line.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        host = PluginHost(disabled=args.disable_plugin)
        if args.command == "plugins":
            _print_plugins(host)
            return EXIT_OK
        commands = {"emu": _emu_start, "agent": _agent, "owner": run_owner_command}
        if args.command in commands:
            return commands[args.command](args)
        plan = load_plan(args.config, _plan_options(args), platform_for=host.default_platform)
        return _run(plan, host)
    except ConfigError as err:
        print(f"vmmig: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except VmmigError as err:
        print(f"vmmig: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("vmmig: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def _run(plan: MigrationPlan, host: PluginHost) -> int:
    def announce(line: str) -> None:
        print(f"vmmig: {line}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(run_migration(plan, host, announce=announce))
    except MigrationCancelled as err:
        print(f"vmmig: {err}", file=sys.stderr)
        return 128 + err.signum
    print(summary(report))
    if plan.json is not None:
        try:
            Path(plan.json).write_text(report.dumps())
        except OSError as err:
            print(f"vmmig: error: cannot write the report to {plan.json}: {err.strerror}",
                  file=sys.stderr)
            return EXIT_FAILED
    if report.status == "completed":
        return EXIT_OK
    if report.status == "cancelled":
        by = report.extra.get("cancelled-by", "SIGINT")
        return 128 + int(signal.Signals[by])
    return EXIT_FAILED


def _emu_start(args: argparse.Namespace) -> int:
    from vmmig.platforms.emu.machine import MachineConfig  # noqa: PLC0415 (Unicorn is heavy)
    from vmmig.platforms.emu.process import serve  # noqa: PLC0415
    from vmmig.platforms.emu.psp import PspCostModel  # noqa: PLC0415
    from vmmig.platforms.emu.sev_launch import SevConfig  # noqa: PLC0415

    qmp = Path(args.qmp)
    # Parsed and checked as the plan's fields are, with the same one-line errors.
    sizes = load_plan(None, {"memory": args.memory, "vcpus": args.vcpus,
                             **_plan_options(args, _PSP_COST)})
    config = MachineConfig(
        name=args.name,
        memory=sizes.memory,
        vcpus=sizes.vcpus,
        tech=args.tech,
        workload=args.workload,
        incoming=args.incoming,
        run_dir=Path(args.run_dir) if args.run_dir else qmp.parent,
        qmp=qmp,
        sev=SevConfig.from_options(args.tech, policy=args.policy,
                                   dh_cert_file=args.dh_cert_file,
                                   session_file=args.session_file, host_dir=args.host_dir,
                                   amd_root=args.amd_root,
                                   cost=PspCostModel(sizes.psp_latency, sizes.psp_rate),
                                   incoming=args.incoming and not args.mh_target),
        firmware=None if args.firmware is None else _read_firmware(Path(args.firmware)),
        mh_queues=args.mh_queues,
        mh_target=args.mh_target,
    )
    asyncio.run(serve(config, paused=args.paused))
    return EXIT_OK


def _read_firmware(path: Path) -> bytes:
    """The bytes of ``--firmware PATH``; ConfigError if unreadable."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError("firmware", f"cannot read {path}: {err.strerror}") from None


def _agent(args: argparse.Namespace) -> int:
    from vmmig.agents.agent import AgentOptions, run_agent  # noqa: PLC0415 (numpy is heavy)

    # The precopy limits are the plan's fields, parsed with the same one-line errors.
    plan = load_plan(None, _plan_options(args, _AGENT_LIMITS))
    return run_agent(AgentOptions(role=args.role, qmp=args.qmp, address=args.address,
                                  limits=precopy_limits(plan), page_path=args.page_path))


def summary(report: MigrationReport) -> str:
    """The human summary table printed at the end of ``vmmig run``."""
    ram = report.ram
    rows = [
        ("status", report.status),
        ("technology", f"{report.technology} on {report.platform}"),
        ("integrity", "not checked" if report.integrity is None
         else ("ok" if report.integrity.ok else "FAILED")),
    ]
    if report.integrity is not None:
        rows += [(f"  {name}", detail) for name, detail in report.integrity.checks.items()]
    rows += [
        ("total time", f"{report.total_time} ms"),
        ("downtime", "-" if report.downtime is None else f"{report.downtime} ms" + (
            " (" + ", ".join(f"{part} {ms} ms" for part, ms in report.downtime_parts.items())
            + ")" if report.downtime_parts else "")),
        ("setup time", f"{report.setup_time} ms"),
        ("transferred", human_size(ram.transferred)),
        ("memory", f"{human_size(ram.total)} ({ram.normal} normal, {ram.duplicate} zero pages)"),
        ("throughput", f"{ram.mbps:.0f} Mbit/s"),
        ("passes", str(ram.dirty_sync_count)),
        ("dirty rate", f"{ram.dirty_pages_rate} pages/s"),
        ("source VM", report.source),
    ]
    rows += [(f"phase {name}", f"{ms} ms") for name, ms in report.phases.items()]
    if report.error:
        rows.append(("error", report.error))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _print_plugins(host: PluginHost) -> None:
    for info in host.plugins():
        origin = info.distribution or "built-in"
        print(f"{info.name} {info.version} ({origin})")
        for tech in info.technologies:
            state = f" [unavailable: {tech.unavailable}]" if tech.unavailable else ""
            print(f"  technology {tech.name}: {tech.summary}{state}")
            print(f"    platforms: {', '.join(tech.platforms)}")
            if tech.features:
                print(f"    features: {', '.join(sorted(tech.features))}")
            for platform, extra in sorted(tech.platform_features.items()):
                print(f"    features on {platform}: {', '.join(sorted(extra))}")
        print(f"  hooks: {', '.join(info.hooks)}")
