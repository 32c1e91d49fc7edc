"""Terminal progress as libvirt shows it, and silence when not on a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from vmmig.plugins.progress import format_progress
from vmmig.report import Progress


class TestFormat:
    def test_line_has_percent_sizes_rate_and_pass(self):
        """The line reads like virsh's: percent, transferred, remaining of total, rate, pass."""
        line = format_progress(Progress(transferred=300 << 20, remaining=768 << 20,
                                        total=1 << 30, mbps=8000.0, pass_=2))
        assert line == ("Migration: [25.00 %] 300.0 MiB sent, 768.0 MiB of 1.0 GiB left, "
                        "1000 MB/s, pass 2")

    def test_percent_is_capped_below_100_until_done(self):
        """As virsh does, progress never shows 100 % while the job runs."""
        assert Progress(transferred=1, remaining=0, total=10, mbps=0, pass_=1).percent == 99.99


@pytest.mark.qemu
class TestTerminal:
    def run_vmmig(self, stderr_tty: bool) -> str:
        args = [sys.executable, "-m", "vmmig", "run", "--memory", "512M", "--workload", "ab",
                "--auto-converge"]
        if not stderr_tty:
            result = subprocess.run(args, capture_output=True, text=True, timeout=300,
                                    check=True)
            return result.stderr
        master, slave = pty.openpty()
        process = subprocess.Popen(args, stderr=slave, stdout=subprocess.DEVNULL)
        os.close(slave)
        output = b""
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 1.0)
                if ready:
                    try:
                        chunk = os.read(master, 65536)
                    except OSError:  # the child closed the terminal
                        break
                    if not chunk:
                        break
                    output += chunk
                elif process.poll() is not None:
                    break
        finally:
            process.kill()
            process.wait(30)
            os.close(master)
        assert process.returncode == 0, output.decode(errors="replace")
        return output.decode(errors="replace")

    def test_progress_is_drawn_on_a_terminal(self):
        """On a terminal, the progress line is drawn in place while memory moves."""
        output = self.run_vmmig(stderr_tty=True)
        assert "Migration: [" in output
        assert "\r\x1b[K" in output

    def test_no_progress_when_not_a_terminal(self):
        """Into a pipe or a log, no progress lines are written."""
        assert "Migration: [" not in self.run_vmmig(stderr_tty=False)
