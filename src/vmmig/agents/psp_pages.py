"""The PSP's own page path (``sev --strategy psp``): the slow baseline the MH is measured against.

The source agent asks its machine's PSP for one SEND_UPDATE_DATA transport
packet per dirty page (``x-sev-send-update-pages``, as AMD's KVM flow: one
PSP command per page; the batch only saves QMP round trips), and ships the
packets as they are; the target agent hands them to its PSP
(``x-sev-receive-update-pages``), which authenticates and stores them.  The
agents never hold plaintext: the packets are AES-CTR under the transport
key the two PSPs agreed on at SEND_START / RECEIVE_START.

A PAGES frame's payload is the QMP packets as JSON (``{"packets": [{"gpa",
"packet-header", "data"}]}``, base64 as QMP has them): the frame carries
them from one PSP to the other untouched.
"""

from __future__ import annotations

import json
from typing import Final

import numpy as np
from qemu.qmp import QMPError

from vmmig.agents.engine import MachineMonitor
from vmmig.channel import Channel
from vmmig.channel.frames import FrameHeader, ProtocolError


__all__ = ["PSP_BATCH_PAGES", "PspSourcePages", "PspTargetPages"]

PAGE: Final = 4096
#: Pages per PAGES frame: the machine's most per ``x-sev-send-update-pages``.
PSP_BATCH_PAGES: Final = 256


class PspSourcePages:
    """Source side: transport packets from the machine's PSP, one per page.

    Every page is sent in full: the host must not learn which are zero.
    """

    batch_pages = PSP_BATCH_PAGES

    def __init__(self, monitor: MachineMonitor) -> None:
        self.monitor = monitor
        self.normal = 0
        self.zero = 0

    def batch(self, page_numbers: np.ndarray) -> list[bytes]:
        """One frame's payload: the PSP's packets for these pages."""
        gpas = [int(page) * PAGE for page in page_numbers.tolist()]
        packets = self.monitor.cmd("x-sev-send-update-pages", gpas=gpas)["packets"]
        self.normal += len(gpas)
        return [json.dumps({"packets": [{"gpa": gpa, **packet} for gpa, packet
                                         in zip(gpas, packets, strict=True)]}).encode()]


class PspTargetPages:
    """Target side: every packet through the machine's PSP, which checks its MAC."""

    def __init__(self, monitor: MachineMonitor) -> None:
        self.monitor = monitor

    def receive(self, channel: Channel, header: FrameHeader) -> int:
        """Store the frame's packets; a packet the PSP refuses ends the stream."""
        try:
            packets = json.loads(bytes(channel.receive_payload(header)))["packets"]
        except (ValueError, KeyError, TypeError) as err:
            raise ProtocolError(f"malformed PSP packets frame: {err}") from None
        try:
            self.monitor.cmd("x-sev-receive-update-pages", packets=packets)
        except QMPError as err:
            raise ProtocolError(f"the target PSP refused a packet: {err}") from None
        return len(packets)
