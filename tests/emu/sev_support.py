"""Helpers shared by the SEV machine tests; this module holds no tests.

The guest owner of a launch, in-process QMP calls, and ``vmmig emu start``
machine processes driven with qemu.qmp.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import subprocess
import sys
import time
from pathlib import Path

from psp_support import owner_session
from qemu.qmp import QMPClient

from vmmig.platforms.emu.machine import Machine, MachineConfig, launch_chunks_for
from vmmig.platforms.emu.psp import (
    Measurement,
    Policy,
    build_secret_packet,
    expected_measurement,
    launch_digest,
)
from vmmig.platforms.emu.sev_launch import SevConfig


MIB = 1 << 20
MEMORY = 16 * MIB
SECRET = b"owner's migration master secret, 64 bytes long, 0123456789abcdef"
CANARY = b"hypervisor-canary-written-in-the-clear!!"
POLICIES = {"sev": Policy(nodbg=True), "sev-es": Policy(nodbg=True, es=True)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Owner:
    """The guest owner of one launch: the session it made for the host, its checks, its secret."""

    def __init__(self, psp, tech: str, policy: Policy | None = None) -> None:
        self.psp = psp
        self.tech = tech
        self.policy = POLICIES[tech] if policy is None else policy
        self.session = owner_session(psp, self.policy)

    def config(self, host_dir: Path, run_dir: Path, **kwargs) -> MachineConfig:
        sev = SevConfig(self.policy, self.session.dh_cert, self.session.session, host_dir)
        return MachineConfig(**{"name": "vm", "memory": MEMORY, "vcpus": 2, "tech": self.tech,
                                "run_dir": run_dir, "sev": sev, **kwargs})

    def options(self, where: Path) -> list[str]:
        """``vmmig emu start`` options carrying this launch's inputs, as base64 files."""
        (where / "dh.b64").write_text(b64(self.session.dh_cert))
        (where / "session.b64").write_text(b64(self.session.session))
        return ["--tech", self.tech, "--policy", hex(self.policy.value),
                "--dh-cert-file", str(where / "dh.b64"),
                "--session-file", str(where / "session.b64")]

    def measurement_ok(self, blob: bytes, launched: MachineConfig) -> bool:
        """Whether the reported blob is a genuine PSP's measurement of ``launched``."""
        measurement = Measurement.from_bytes(blob)
        expected = expected_measurement(
            tik=self.session.tik, firmware=self.psp.firmware, policy=self.policy,
            launch_digest=launch_digest(launch_chunks_for(launched)),
            mnonce=measurement.mnonce)
        return hmac.compare_digest(expected, measurement.measure)

    def secret_args(self, blob: bytes, secret: bytes = SECRET) -> dict[str, str]:
        """``sev-inject-launch-secret`` arguments carrying ``secret`` into the measured VM."""
        header, ciphertext = build_secret_packet(self.session.tek, self.session.tik,
                                                 Measurement.from_bytes(blob), secret)
        return {"packet-header": b64(header), "secret": b64(ciphertext)}


def qmp(machine: Machine, name: str, **arguments):
    """Run a machine's QMP command in this process, arguments checked as the server does."""
    command = machine.commands.get(name)
    assert command is not None, name
    return command.handler(**command.bind({k.replace("_", "-"): v for k, v in arguments.items()}))


@contextlib.asynccontextmanager
async def machine_process(tmp_path: Path, *options: str):
    """A ``vmmig emu start -S`` process of 16 MiB; yields a connected qemu.qmp client."""
    socket_path = tmp_path / "vm.qmp"
    argv = [sys.executable, "-m", "vmmig", "emu", "start", "--memory", "16M", "--smp", "2",
            "--qmp", str(socket_path), "-S", *options]
    with subprocess.Popen(argv, stderr=subprocess.PIPE) as process:
        try:
            deadline = time.monotonic() + 30
            while not socket_path.exists():
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline, "the machine opened no QMP socket"
                await asyncio.sleep(0.02)
            client = QMPClient("owner")
            await client.connect(str(socket_path))
            yield client
            await client.execute("quit")
            with contextlib.suppress(EOFError):
                await client.disconnect()
            assert process.wait(30) == 0
        finally:
            process.kill()
