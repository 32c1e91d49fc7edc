"""``vmmig owner``: the guest owner's command line (``serve`` and ``expect``).

::

    vmmig owner expect --state DIR --guest NAME --tech sev|sev-es [--memory SIZE]
                       [--vcpus N] [--workload W] [--policy WORD] [--min-api M.N]
                       [--firmware PATH] [--mh-queues N] [--mh-target] [--amd-root DIR]
    vmmig owner serve  --state DIR --listen unix:PATH|tcp:HOST:PORT [--amd-root DIR]

``expect`` is the tenant recording how a guest must launch (the launch
digest of an emulated machine started with the same options; a migrating
guest needs it twice, once more with ``--mh-target`` for its migration
target's launch); ``serve`` answers launches over :mod:`.protocol`.
``--amd-root`` pins the emulated AMD root's ASK and ARK certificates in a
new state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from vmmig.owner.expected import ExpectedLaunch


__all__ = ["add_owner_parser", "run_owner_command"]


def add_owner_parser(sub: Any) -> None:  # noqa: ANN401 (argparse's private subparsers type)
    """Add ``owner serve`` and ``owner expect`` to the ``vmmig`` parser's subcommands."""
    owner = sub.add_parser("owner", help="the guest owner (the tenant's key service)")
    owner_sub = owner.add_subparsers(dest="owner_command", required=True,
                                     parser_class=type(owner))
    serve = owner_sub.add_parser("serve", help="serve launches over a JSON-lines socket")
    serve.add_argument("--listen", required=True, metavar="ADDRESS",
                       help="unix:PATH or tcp:HOST:PORT")
    expect = owner_sub.add_parser("expect", help="record how a guest must launch")
    expect.add_argument("--guest", required=True, help="the guest's id")
    expect.add_argument("--tech", required=True, choices=("sev", "sev-es"))
    expect.add_argument("-m", "--memory", default="1G", metavar="SIZE")
    expect.add_argument("--smp", "--vcpus", dest="vcpus", default="1", metavar="N")
    expect.add_argument("--workload", default="ab")
    expect.add_argument("--policy", metavar="WORD", help="default: vmmig emu start's")
    expect.add_argument("--min-api", default="0.0", metavar="MAJOR.MINOR",
                        help="oldest firmware API accepted")
    expect.add_argument("--firmware", type=Path, metavar="PATH",
                        help="the MH firmware image (default: the built-in one)")
    expect.add_argument("--mh-queues", type=int, default=1, metavar="N",
                        help="mailbox queues, one per helper vCPU (1 to 4)")
    expect.add_argument("--mh-target", action="store_true",
                        help="record the migration target's launch (vmmig emu start "
                             "--incoming --mh-target), not the guest's boot")
    for command in (serve, expect):
        command.add_argument("--state", required=True, type=Path, metavar="DIR",
                             help="the owner's state directory")
        command.add_argument("--amd-root", type=Path, metavar="DIR",
                             help="the emulated AMD root to trust (pinned on first use)")


def run_owner_command(args: argparse.Namespace) -> int:
    """Run ``vmmig owner ...``; exit status 0 (errors raise, the CLI prints them)."""
    # The owner's crypto and the emulated machine are imported only when used.
    from vmmig.owner.guest_owner import GuestOwner  # noqa: PLC0415
    from vmmig.owner.service import serve_owner  # noqa: PLC0415
    from vmmig.owner.state import TrustAnchor  # noqa: PLC0415
    from vmmig.platforms.emu.psp import EmulatedAmdRoot  # noqa: PLC0415

    trust = None
    if args.amd_root is not None:
        root = EmulatedAmdRoot.load_or_create(args.amd_root)
        trust = TrustAnchor(root.ask_cert, root.ark_cert)
    owner = GuestOwner.open(args.state, trust)
    if args.owner_command == "expect":
        owner.expect(args.guest, _expected(args))
        return 0

    def ready(address: str) -> None:
        print(f"vmmig owner: serving {args.state} on {address}", file=sys.stderr, flush=True)

    asyncio.run(serve_owner(owner, args.listen, ready))
    return 0


def _expected(args: argparse.Namespace) -> ExpectedLaunch:
    from vmmig.config import load_plan  # noqa: PLC0415
    from vmmig.errors import ConfigError  # noqa: PLC0415
    from vmmig.owner.expected import expected_launch_for  # noqa: PLC0415
    from vmmig.platforms.emu.psp import FirmwareVersion, Policy  # noqa: PLC0415

    sizes = load_plan(None, {"memory": args.memory, "vcpus": args.vcpus})
    try:
        major, minor = (int(part) for part in args.min_api.split("."))
        min_firmware = FirmwareVersion(major, minor)
    except ValueError:
        raise ConfigError("min-api", f"{args.min_api!r} is not MAJOR.MINOR") from None
    try:
        policy = None if args.policy is None else Policy.from_value(int(args.policy, 0))
    except ValueError as err:
        raise ConfigError("policy", f"{args.policy!r} is not a policy word: {err}") from None
    try:
        firmware = None if args.firmware is None else args.firmware.read_bytes()
    except OSError as err:
        raise ConfigError("firmware", f"cannot read {args.firmware}: {err.strerror}") from None
    return expected_launch_for(args.tech, memory=sizes.memory, vcpus=sizes.vcpus,
                               workload=args.workload, policy=policy,
                               min_firmware=min_firmware, mh_queues=args.mh_queues,
                               mh_target=args.mh_target, firmware=firmware)
