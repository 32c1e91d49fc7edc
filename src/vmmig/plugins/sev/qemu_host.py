"""What a real host needs for ``sev``/``sev-es`` on the ``qemu`` platform, checked up front.

Each check names what is missing in words an operator can act on; the
technology stops with the whole list before any VM is started.  The last
requirement (QEMU with vmmig's helper-vCPU patches) cannot be met yet:
``qemu-patches/`` does not hold them, so the list is never empty today.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmmig.errors import HostRequirementError
from vmmig.platforms.qemu.host import find_qemu, kvm_status


__all__ = ["sev_host_problems"]

SEV_DEVICE = Path("/dev/sev")
KVM_AMD_PARAMETERS = Path("/sys/module/kvm_amd/parameters")
#: Seconds ``qemu-system-x86_64 -object help`` may take.
_QEMU_HELP_TIMEOUT = 30


def _kvm_amd_enabled(parameter: str, parameters: Path) -> bool:
    try:
        return (parameters / parameter).read_text().strip() in {"Y", "1"}
    except OSError:
        return False


def _qemu_problem() -> str | None:
    try:
        binary = find_qemu()
    except HostRequirementError as err:
        return str(err)
    try:
        listing = subprocess.run([str(binary.path), "-object", "help"], capture_output=True,
                                 text=True, timeout=_QEMU_HELP_TIMEOUT, check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{binary.path} -object help failed: {err}"
    if "sev-guest" not in listing:
        return f"{binary.path} has no sev-guest object (built without SEV support)"
    return None


def sev_host_problems(*, es: bool, device: Path = SEV_DEVICE,
                      parameters: Path = KVM_AMD_PARAMETERS) -> list[str]:
    """Everything this host lacks to migrate an SEV (``es``: SEV-ES) guest on real QEMU.

    :param device: the SEV firmware device node.
    :param parameters: kvm_amd's module parameters directory.
    """
    problems = []
    if not os.access(device, os.R_OK | os.W_OK):
        problems.append(f"{device}: the SEV firmware device is missing or not accessible "
                        "(an AMD EPYC host with SEV enabled in firmware and the ccp module)")
    usable, reason = kvm_status()
    if not usable:
        problems.append(f"KVM is not usable ({reason})")
    for parameter in ("sev", "sev_es") if es else ("sev",):
        if not _kvm_amd_enabled(parameter, parameters):
            problems.append(f"kvm_amd does not enable {parameter.replace('_', '-')} "
                            f"({parameters / parameter} is not Y)")
    if (qemu := _qemu_problem()) is not None:
        problems.append(qemu)
    problems.append("a QEMU with vmmig's helper-vCPU and Migration Handler patches "
                    "(qemu-patches/ does not hold them yet)")
    return problems
