"""A guest's serial console (COM1), as the vCPUs' port writes deliver it."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Final


__all__ = ["COM1", "SerialConsole"]

#: The first serial port's data register, where our guests print progress marks.
COM1: Final = 0x3F8
#: Characters of output kept.
TAIL: Final = 1 << 16


class SerialConsole:
    """Collects what the guest writes to COM1; other ports are ignored.

    Keeps the last :data:`TAIL` characters and a count of every character
    ever written (guests print a mark per pass: a long run must not grow
    without bound).  Thread-safe: vCPU threads write, anyone may wait for
    output.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tail: deque[str] = deque(maxlen=TAIL)
        self._counts: Counter[str] = Counter()

    def write(self, port: int, size: int, value: int) -> None:
        """A vCPU's ``out`` to ``port`` (the :class:`~vmmig.platforms.emu.vcpu.Vcpu` handler)."""
        if port == COM1:
            char = chr(value & 0xFF)
            with self._cond:
                self._tail.append(char)
                self._counts[char] += 1
                self._cond.notify_all()

    @property
    def text(self) -> str:
        """The last :data:`TAIL` characters written."""
        with self._cond:
            return "".join(self._tail)

    def counts(self) -> dict[str, int]:
        """How often each character was written, since the machine started."""
        with self._cond:
            return dict(self._counts)

    def wait_for(self, char: str, count: int, timeout: float) -> bool:
        """Wait until ``char`` has been written ``count`` times; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._counts[char] >= count, timeout)
