"""The ``qemu`` platform: real QEMU processes, KVM when usable, TCG otherwise.

- :mod:`~vmmig.platforms.qemu.host`: find QEMU, check KVM, choose the accelerator.
- :mod:`~vmmig.platforms.qemu.machine`: start one QEMU and drive it over QMP.
"""

from __future__ import annotations

from vmmig.platforms.qemu.host import Accel, QemuBinary, choose_accel, find_qemu, kvm_status
from vmmig.platforms.qemu.machine import (
    QemuMachine,
    QemuMachineSpec,
    qemu_argv,
)


__all__ = [
    "Accel",
    "QemuBinary",
    "QemuMachine",
    "QemuMachineSpec",
    "choose_accel",
    "find_qemu",
    "kvm_status",
    "qemu_argv",
]
