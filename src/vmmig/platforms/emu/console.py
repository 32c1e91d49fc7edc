"""A guest's serial console (COM1), as the vCPUs' port writes deliver it."""

from __future__ import annotations

import threading
from typing import Final


__all__ = ["COM1", "SerialConsole"]

#: The first serial port's data register, where our guests print progress marks.
COM1: Final = 0x3F8


class SerialConsole:
    """Collects what the guest writes to COM1; other ports are ignored.

    Thread-safe: vCPU threads write, anyone may wait for output.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._text: list[str] = []

    def write(self, port: int, size: int, value: int) -> None:
        """A vCPU's ``out`` to ``port`` (the :class:`~vmmig.platforms.emu.vcpu.Vcpu` handler)."""
        if port == COM1:
            with self._cond:
                self._text.append(chr(value & 0xFF))
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """Everything written so far."""
        with self._cond:
            return "".join(self._text)

    def wait_for(self, char: str, count: int, timeout: float) -> bool:
        """Wait until ``char`` has been written ``count`` times; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._text.count(char) >= count, timeout)
