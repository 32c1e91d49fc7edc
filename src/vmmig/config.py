"""The migration plan: TOML file and command line, loaded into frozen attrs data.

Every plan field is a top-level TOML key and a ``vmmig run`` option of the
same name (``downtime-limit = 300`` / ``--downtime-limit 300``); an option
overrides the file.  Values are converted and validated at load time, so a
bad plan fails with one line naming the field, before any VM is touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import tomli

from vmmig.core.precopy import PrecopyLimits
from vmmig.errors import ConfigError


__all__ = ["MigrationPlan", "PlanField", "load_plan", "parse_size", "plan_fields",
           "precopy_limits", "requested_features"]

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: object) -> int:
    """Parse a size like QEMU's ``-m``: ``1G``, ``512M``, ``1GiB``; ``4096B`` is bytes, a bare
    number MiB."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 1G or 512M")
    if isinstance(value, int):
        return value << 20
    if not isinstance(value, str) or not (match := _SIZE.match(value)):
        raise ValueError(f"expected a size such as 1G or 512M, got {value!r}")
    number, unit = int(match[1]), match[2].upper()
    if not unit:
        return number if match[3] else number << 20  # "4096B" is bytes
    return number * _UNITS[unit]


def _integer(low: int, high: int | None = None, unit: str = "") -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}{unit}, got {number}")
        return number

    return parse


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if number < 0:
        raise ValueError(f"must be 0 (no limit) or more seconds, got {number:g}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "yes", "on", "1"}:
        return True
    if isinstance(value, str) and value.lower() in {"false", "no", "off", "0"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def _workload(value: object) -> str:
    # The workloads a platform offers are checked when the VM starts; here only the shape.
    if not isinstance(value, str) or not re.match(r"^[a-z][a-z0-9-]*(:[^\s]+)?$", value):
        raise ValueError(f"expected a workload such as ab, idle or dirty:64M, got {value!r}")
    return value


def _rate(value: object) -> int:
    rate = parse_size(value)
    if rate <= 0:
        raise ValueError(f"must be more than 0 bytes per second, got {value!r}")
    return rate


def _microseconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected microseconds, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected microseconds, got {value!r}") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"must be 0 or more microseconds, got {value}")
    return number


def _uri(value: object) -> str:
    if not isinstance(value, str) or not re.match(r"^(tcp:[^:]+:\d+|unix:/.+)$", value):
        raise ValueError(f"expected tcp:HOST:PORT or unix:/PATH, got {value!r}")
    return value


def _owner(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a directory or unix:PATH / tcp:HOST:PORT, got {value!r}")
    if value.startswith("tcp:") and not re.match(r"^tcp:[^:]+:\d+$", value):
        raise ValueError(f"expected tcp:HOST:PORT, got {value!r}")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


@attrs.frozen
class PlanField:
    """How one plan field is named, parsed and documented."""

    name: str
    parse: Callable[[object], Any]
    help: str
    metavar: str | None = None
    flag: bool = False


def _field(default: Any, parse: Callable[[object], Any], help_: str,  # noqa: ANN401
           metavar: str | None = None, *, flag: bool = False) -> Any:  # noqa: ANN401 (an attrs field)
    return attrs.field(default=default, metadata={"vmmig": (parse, help_, metavar, flag)})


@attrs.frozen(kw_only=True)
class MigrationPlan:
    """Everything one ``vmmig run`` needs to know, validated."""

    tech: str = _field("plain", _text, "migration technology (see `vmmig plugins`)", "NAME")
    platform: str = _field("qemu", _choice("qemu", "emu"), "where the VMs run: qemu or emu "
                           "(default: the technology's first, e.g. emu for sev-es)")
    memory: int = _field(1 << 30, parse_size, "guest RAM, e.g. 1G or 512M", "SIZE")
    vcpus: int = _field(1, _integer(1, 64), "guest vCPUs", "N")
    workload: str = _field("ab", _workload, "guest program: ab (dirties every page) or idle")
    accel: str = _field("auto", _choice("auto", "kvm", "tcg"), "QEMU accelerator: auto, kvm or tcg")
    bandwidth: int = _field(0, _integer(0, unit=" MiB/s"), "bandwidth cap in MiB/s (0: none)",
                            "MIB")
    downtime_limit: int = _field(300, _integer(1, unit=" ms"), "allowed downtime in ms", "MS")
    auto_converge: bool = _field(False, _boolean, "throttle the guest's vCPUs to converge",
                                 flag=True)
    multifd_channels: int = _field(0, _integer(0, 255), "parallel channels (0: one stream)", "N")
    timeout: float = _field(600.0, _seconds,
                            "give up (and roll back) after this many seconds (0: never)", "S")
    transport: str = _field("tcp", _choice("tcp", "unix"), "migration channel: tcp or unix")
    listen: str = _field("127.0.0.1", _text, "address the target listens on (tcp)", "ADDR")
    migrate_uri: str | None = _field(None, _uri, "URI the source connects to "
                                     "(default: where the target listens)", "URI")
    json: str | None = _field(None, _text, "write the report as JSON to this file", "FILE")
    strategy: str = _field("mh", _choice("mh", "psp"), "sev/sev-es page path: mh (the guest's "
                           "Migration Handler) or psp (the PSP's SEND/RECEIVE commands)")
    # Two: the source's MH then seals a batch while the agent sends the one before
    # (benchmarks/sev_vs_plain.py: ~10 % faster than one on a 2-CPU host).
    mh_queues: int = _field(2, _integer(1, 4), "Migration Handler mailbox queues, one per "
                            "helper vCPU", "N")
    owner: str | None = _field(None, _owner, "sev/sev-es guest owner: a state directory (kept "
                               "there; expected launches recorded on first use) or the "
                               "unix:PATH / tcp:HOST:PORT of `vmmig owner serve` (default: "
                               "in process, forgotten after the run)", "DIR|ADDRESS")
    # The emulated PSP's cost model; defaults are assumptions (vmmig.platforms.emu.psp.cost).
    psp_latency: float = _field(15.0, _microseconds, "emulated PSP: latency per command in "
                                "microseconds (an assumption)", "US")
    psp_rate: int = _field(50_000_000, _rate, "emulated PSP: guest data per second, e.g. "
                           "50M (an assumption)", "SIZE")


def plan_fields() -> tuple[PlanField, ...]:
    """The plan's fields, with their option names (``downtime-limit``) and help."""
    out = []
    for attribute in attrs.fields(MigrationPlan):
        parse, help_, metavar, flag = attribute.metadata["vmmig"]
        out.append(PlanField(attribute.name.replace("_", "-"), parse, help_, metavar, flag))
    return tuple(out)


def load_plan(path: Path | None = None,
              overrides: Mapping[str, object] | None = None, *,
              platform_for: Callable[[str], str] | None = None) -> MigrationPlan:
    """Load a plan from a TOML file, then apply command-line overrides.

    :param path: the TOML plan, or None for defaults only.
    :param overrides: option name (``downtime-limit``) -> raw value from the command line.
    :param platform_for: the platform a technology runs on when the plan names
        none (``vmmig run --tech sev-es`` means the emulated platform).
    :raises ConfigError: naming the file or option and the field.
    """
    fields = {field.name: field for field in plan_fields()}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as stream:
                document = tomli.load(stream)
        except OSError as err:
            raise ConfigError(str(path), f"cannot read the plan: {err.strerror}") from None
        except tomli.TOMLDecodeError as err:
            raise ConfigError(str(path), f"not valid TOML: {err}") from None
        for key, raw in document.items():
            if key not in fields:
                raise ConfigError(f"{path}: {key}", f"unknown field; known: {', '.join(fields)}")
            values[key] = _convert(fields[key], raw, f"{path}: {key}")
    for key, raw in (overrides or {}).items():
        values[key] = _convert(fields[key], raw, f"--{key}")
    if "platform" not in values and platform_for is not None:
        values["platform"] = platform_for(values.get("tech", MigrationPlan().tech))
    return MigrationPlan(**{key.replace("-", "_"): value for key, value in values.items()})


def _convert(field: PlanField, raw: object, where: str) -> object:
    try:
        return field.parse(raw)
    except ValueError as err:
        raise ConfigError(where, str(err)) from None


def requested_features(plan: MigrationPlan) -> tuple[str, ...]:
    """The optional features a plan asks of its technology (options set off their default)."""
    wanted = {"auto-converge": plan.auto_converge, "bandwidth": plan.bandwidth > 0,
              "multifd": plan.multifd_channels > 0, "psp-strategy": plan.strategy == "psp",
              "mh-queues": plan.mh_queues != attrs.fields(MigrationPlan).mh_queues.default}
    return tuple(feature for feature, asked in wanted.items() if asked)


def precopy_limits(plan: MigrationPlan) -> PrecopyLimits:
    """The plan's limits in the precopy engine's units (seconds, bytes per second)."""
    return PrecopyLimits(downtime_limit=plan.downtime_limit / 1000,
                         bandwidth_cap=float(plan.bandwidth << 20),
                         auto_converge=plan.auto_converge)
