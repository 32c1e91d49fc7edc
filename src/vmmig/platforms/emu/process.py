"""The machine process: ``vmmig emu start`` serves one :class:`Machine` over QMP until ``quit``.

Like QEMU, the guest runs at once unless started paused (``-S``) or as a
migration target (``--incoming``); ``quit``, SIGTERM or SIGINT end the
process after stopping the vCPUs and removing its files.
"""

from __future__ import annotations

import asyncio
import signal

from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.qmp_server import QmpServer


__all__ = ["serve"]


async def serve(config: MachineConfig, *, paused: bool = False) -> None:
    """Run a machine until it is told to quit.

    :param config: the machine.
    :param paused: start with the vCPUs stopped, as QEMU's ``-S``.
    """
    machine = Machine(config)
    done = asyncio.Event()
    server = QmpServer(machine.commands, on_quit=done.set)
    machine.on_event = server.emit
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    try:
        await server.start(config.qmp_path)
        if not (paused or config.incoming):
            machine.start()
        await done.wait()
    finally:
        await server.close()
        machine.close()
