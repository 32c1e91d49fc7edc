"""What the host offers QEMU: the binary, its version, and the accelerator.

Everything here is synchronous and cheap; the CLI calls it once before it
starts any machine, so that a missing requirement stops vmmig before it
touches a VM.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import attrs

from vmmig.errors import ConfigError, HostRequirementError


__all__ = ["Accel", "QemuBinary", "choose_accel", "find_qemu", "kvm_status"]

logger = logging.getLogger(__name__)

#: The QEMU system emulator vmmig drives.
QEMU_BINARY = "qemu-system-x86_64"

#: Oldest QEMU vmmig supports (``memory-backend`` on ``-machine``, QMP as used).
MIN_QEMU_VERSION = (7, 0, 0)

#: ``KVM_GET_API_VERSION`` = ``_IO(KVMIO, 0x00)``; the API has been 12 since Linux 2.6.22.
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12

#: Where Linux exposes KVM.
KVM_DEVICE = Path("/dev/kvm")

_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


@attrs.frozen
class QemuBinary:
    """A QEMU system emulator found on this host.

    :param path: absolute path of the executable.
    :param version: its ``(major, minor, micro)`` version.
    """

    path: Path
    version: tuple[int, int, int]


@attrs.frozen
class Accel:
    """The accelerator machines run with, and why it was chosen.

    :param name: ``"kvm"`` or ``"tcg"``.
    :param reason: one line for the user, e.g. ``"TCG (/dev/kvm missing)"``.
    """

    name: Literal["kvm", "tcg"] = attrs.field(validator=attrs.validators.in_(("kvm", "tcg")))
    reason: str


def find_qemu(binary: str | None = None) -> QemuBinary:
    """Find ``qemu-system-x86_64`` and check that it is recent enough.

    :param binary: a path or a command name; ``qemu-system-x86_64`` on
        ``PATH`` when ``None``.
    :return: the binary and its version.
    :raise HostRequirementError: it is missing, not runnable, or older than 7.0.
    """
    name = binary or QEMU_BINARY
    found = shutil.which(name)
    if found is None:
        if binary is None:
            raise HostRequirementError(
                f"{QEMU_BINARY} not found on PATH; install QEMU (Debian package qemu-system-x86)"
            )
        raise HostRequirementError(f"QEMU binary {binary} not found or not executable")
    path = Path(found).absolute()
    try:
        result = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HostRequirementError(f"cannot run {path} --version: {err}") from err
    match = _VERSION_RE.search(result.stdout)
    if result.returncode != 0 or match is None:
        output = (result.stdout + result.stderr).strip().splitlines()
        first = output[0] if output else f"no output, exit status {result.returncode}"
        raise HostRequirementError(f"cannot read the QEMU version of {path}: {first!r}")
    major, minor, micro = match.groups()
    version = (int(major), int(minor), int(micro or 0))
    if version < MIN_QEMU_VERSION:
        raise HostRequirementError(
            f"QEMU {'.'.join(map(str, version))} at {path} is too old; "
            f"vmmig needs QEMU {MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]} or newer"
        )
    logger.debug("found QEMU %s at %s", ".".join(map(str, version)), path)
    return QemuBinary(path=path, version=version)


def kvm_status(device: Path = KVM_DEVICE) -> tuple[bool, str]:
    """Tell whether KVM is usable, by opening the device and asking its API version.

    Opening is not enough: a container may expose a device node that does
    not answer, and only the ioctl proves a KVM is behind it.

    :param device: the KVM device node.
    :return: ``(usable, reason)``, e.g. ``(False, "/dev/kvm: permission denied")``.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{device} missing"
    except OSError as err:
        return False, f"{device}: {_strerror(err)}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as err:
        problem = "not a KVM device" if err.errno == errno.ENOTTY else (
            f"KVM_GET_API_VERSION failed: {_strerror(err)}")
        return False, f"{device}: {problem}"
    finally:
        os.close(fd)
    if version != _KVM_API_VERSION:
        return False, f"{device}: KVM API version {version}, expected {_KVM_API_VERSION}"
    return True, f"{device} usable"


def _strerror(err: OSError) -> str:
    """``"permission denied"`` from ``PermissionError(13, "Permission denied")``."""
    return (err.strerror or str(err)).lower()


def choose_accel(requested: Literal["auto", "kvm", "tcg"]) -> Accel:
    """Pick the accelerator: KVM when asked for or when ``auto`` finds it usable.

    :param requested: ``"auto"``, ``"kvm"`` or ``"tcg"``.
    :return: the accelerator and the reason for it.
    :raise HostRequirementError: ``kvm`` was requested but is not usable.
    :raise ConfigError: ``requested`` is none of the three.
    """
    if requested == "tcg":
        return Accel("tcg", "TCG (requested)")
    if requested not in ("auto", "kvm"):
        raise ConfigError("accel", f"unknown accelerator {requested!r}; use auto, kvm or tcg")
    usable, reason = kvm_status()
    if usable:
        return Accel("kvm", f"KVM ({reason})")
    if requested == "kvm":
        raise HostRequirementError(f"KVM was requested but is not usable: {reason}")
    return Accel("tcg", f"TCG ({reason})")
