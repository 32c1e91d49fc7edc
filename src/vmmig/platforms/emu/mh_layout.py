"""Where an emulated SEV guest keeps its Migration Handler: firmware, launch block, mailbox.

Guest-physical layout of an ``sev`` or ``sev-es`` machine (on top of the
program layout in :mod:`vmmig.guests.emu`)::

    0x01F000  the MH's launch configuration (:class:`~vmmig.firmware.image.MhLaunchConfig`)
    0x020000  the MH firmware blob (:func:`~vmmig.firmware.image.builtin_image`,
              or ``--firmware FILE``), at most up to 0xF0000
    0x0F0000  OVMF's secret area (:data:`~.sev_launch.SECRET_AREA`)
    ...       the workload's data, from 1 MiB up to the reservation
    mailbox   the MH's reservation: from the mailbox GPA to the end of RAM

The reservation holds the mailbox region (ABI §1: header, queue table, two
slots per queue) and starts on a 2 MiB boundary, the guest's page size
(the loader maps RAM with 2 MiB pages): firmware shares whole large pages,
and the workloads never touch it.  All of it is in the measured first MiB
except the reservation, which the MH shares with the host at start.
"""

from __future__ import annotations

import mmap
from typing import Final

import attrs

from vmmig.errors import ConfigError
from vmmig.firmware.abi import MailboxLayout, Role
from vmmig.firmware.image import (
    FIRMWARE_END,
    FIRMWARE_GPA,
    MH_CONFIG_GPA,
    MH_CONFIG_SIZE,
    MhLaunchConfig,
)
from vmmig.guests.emu import DATA_START
from vmmig.platforms.emu.sev_launch import LAUNCH_IMAGE, SECRET_AREA


__all__ = ["LARGE_GUEST", "MAILBOX_ALIGN", "MAX_MH_QUEUES", "MhReservation", "load_firmware"]

#: The reservation starts on a guest large-page boundary.
MAILBOX_ALIGN: Final = 2 << 20
#: The most mailbox queues (helper vCPUs) ``--mh-queues`` takes.
MAX_MH_QUEUES: Final = 4
#: Guests from this much RAM on get the larger records.
LARGE_GUEST: Final = 512 << 20
#: Least room the workload keeps above 1 MiB.
_MIN_DATA: Final = 1 << 20

# The firmware and its block lie inside the measured image, below the secret area.
assert SECRET_AREA[0] >= FIRMWARE_END
assert LAUNCH_IMAGE[1] >= FIRMWARE_END
assert FIRMWARE_GPA >= MH_CONFIG_GPA + MH_CONFIG_SIZE


@attrs.frozen
class MhReservation:
    """The top of RAM an SEV guest keeps for its MH's mailbox.

    :ivar ram_size: guest RAM in bytes.
    :ivar queue_count: mailbox queues, 1 to :data:`MAX_MH_QUEUES`.
    """

    ram_size: int
    queue_count: int = 1

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.queue_count <= MAX_MH_QUEUES:
            raise ConfigError("mh-queues", f"{self.queue_count} queues: choose 1 to "
                              f"{MAX_MH_QUEUES}")
        if self.mailbox_gpa < DATA_START + _MIN_DATA:
            raise ConfigError("memory", f"{self.ram_size} bytes of RAM leave no room for the "
                              f"workload below the MH mailbox ({self.layout.region_size} bytes "
                              f"for {self.queue_count} queue(s))")

    @property
    def max_batch_pages(self) -> int:
        """Pages per record: 1024 from :data:`LARGE_GUEST` of RAM on (a record's fixed
        costs, mailbox round trips and wake-ups, matter: 1 GiB moves ~20 % faster than
        with 512, benchmarks/sev_vs_plain.py), else 512 (the mailbox stays small)."""
        return 1024 if self.ram_size >= LARGE_GUEST else 512

    @property
    def layout(self) -> MailboxLayout:
        """The mailbox region's layout (ABI §1)."""
        return MailboxLayout(queue_count=self.queue_count, max_batch_pages=self.max_batch_pages)

    @property
    def mailbox_gpa(self) -> int:
        """Start of the region (and of the reservation): 2 MiB aligned, below the end of RAM."""
        top = self.ram_size - self.layout.region_size
        return max(0, top - top % MAILBOX_ALIGN)

    @property
    def reserved_size(self) -> int:
        """Bytes from the mailbox GPA to the end of RAM."""
        return self.ram_size - self.mailbox_gpa


def load_firmware(ram: mmap.mmap, reservation: MhReservation, roles: frozenset[Role],
                  image: bytes) -> None:
    """Write the MH firmware blob and its launch configuration into guest RAM, as OVMF's flash.

    :raises ConfigError: the blob does not fit below the secret area.
    """
    if FIRMWARE_GPA + len(image) > FIRMWARE_END:
        raise ConfigError("firmware", f"a firmware image of {len(image)} bytes does not fit "
                          f"[{FIRMWARE_GPA:#x}, {FIRMWARE_END:#x})")
    config = MhLaunchConfig(roles, reservation.queue_count, reservation.mailbox_gpa,
                            reservation.reserved_size, len(image))
    ram[MH_CONFIG_GPA:MH_CONFIG_GPA + MH_CONFIG_SIZE] = config.pack()
    ram[FIRMWARE_GPA:FIRMWARE_GPA + len(image)] = image
