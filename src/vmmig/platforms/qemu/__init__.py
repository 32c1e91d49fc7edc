"""The ``qemu`` platform: real QEMU processes, KVM when usable, TCG otherwise.

- :mod:`~vmmig.platforms.qemu.host`: find QEMU, check KVM, choose the accelerator.
- :mod:`~vmmig.platforms.qemu.machine`: start one QEMU and drive it over QMP.
- :mod:`~vmmig.platforms.qemu.fleet`: own all machines of a run and end them.
"""

from __future__ import annotations

from vmmig.platforms.qemu.fleet import Fleet
from vmmig.platforms.qemu.host import Accel, QemuBinary, choose_accel, find_qemu, kvm_status
from vmmig.platforms.qemu.machine import (
    QemuMachine,
    QemuMachineSpec,
    default_workdir,
    qemu_argv,
)


__all__ = [
    "Accel",
    "Fleet",
    "QemuBinary",
    "QemuMachine",
    "QemuMachineSpec",
    "choose_accel",
    "default_workdir",
    "find_qemu",
    "kvm_status",
    "qemu_argv",
]
