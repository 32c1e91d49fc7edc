"""An SEV-ES guest's vCPUs as its Migration Handler reaches them (inside the trust domain).

The hypervisor's register commands stay refused for SEV-ES; the MH, which is
guest firmware, reads a stopped vCPU's state from its save area and, on a
target, hands each waiting vCPU its state at COMMIT.  The target's vCPUs
wait parked until then (they have no state of their own: an MH target runs
no program), and continue from the source's exact instruction once the
hypervisor lets the VM run, which it may only after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vmmig.platforms.emu.vcpu import Vcpu
from vmmig.platforms.emu.vmsa import Vmsa


__all__ = ["VcpuStates"]


class VcpuStates:
    """:class:`~vmmig.firmware.cpus.GuestCpus` over an emulated machine's vCPUs."""

    def __init__(self, vcpus: Sequence[Vcpu]) -> None:
        self._vcpus = vcpus

    @property
    def count(self) -> int:
        """The guest's vCPUs."""
        return len(self._vcpus)

    def save(self, index: int) -> bytes:
        """The stopped vCPU's registers (PlatformError while it runs)."""
        return self._vcpus[index].save_vmsa().pack()

    def restore(self, states: Mapping[int, bytes]) -> None:
        """Load every vCPU's registers, as the firmware's resume path does."""
        for index, state in states.items():
            self._vcpus[index].load_vmsa(Vmsa.unpack(state))
