"""The guest console the emu tests wait on: a bounded wait that fails the test with the output."""

from __future__ import annotations

import pytest

from vmmig.platforms.emu.console import SerialConsole


class Console(SerialConsole):
    """The guest's console, failing the test when a mark does not come in time."""

    def wait_for(self, char: str, count: int, timeout: float = 10.0) -> bool:
        if not super().wait_for(char, count, timeout):
            pytest.fail(f"no {count} x {char!r} on the console in {timeout} s: {self.text!r}")
        return True
