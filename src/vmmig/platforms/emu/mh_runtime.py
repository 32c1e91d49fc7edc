"""The Migration Handler on its helper vCPU: a machine-process thread the guest OS never uses.

On ``emu`` the MH is Python firmware (:mod:`vmmig.firmware`).  It is trusted
guest code, so it works on the guest's plaintext view of RAM; it talks to
the hypervisor only through its mailbox in guest-shared pages (ABI
``docs/mh-mailbox-abi.md``) and an interrupt line.  QMP:

``x-mh-start``
    The hypervisor starts the helper vCPU, as QEMU's helper-vCPU patches
    would.  The MH checks that the launch image holds the built-in MH
    (a foreign blob cannot be executed here), reads its measured launch
    configuration and the migration master secret from the secret area
    (OVMF's secret table; without it the MH refuses to run and the command
    fails), shares its mailbox pages (the KVM_HC_MAP_GPA_RANGE conversion),
    writes the region header and queue descriptors, and then serves.
``x-query-mh``
    ``{"state": "stopped"|"running"|"committed"|"retired"|"failed",
    "mailbox-gpa", "mailbox-size", "queues", "irq-path", "shared-path",
    "role": "source"|"target"|null}``; ``role`` is the session's, null
    while none is open.

The interrupt line is a Unix SOCK_SEQPACKET socket, ``<run_dir>/<name>.mh``,
listening from ``x-mh-start`` on, one host connection at a time.  The host
writes a request into its slot and the doorbell word (ABI §1.3), then sends
one byte, the queue index.  The MH thread blocks on the socket (no
polling); on any message, whatever its bytes (a lost or wrong queue index
only costs a scan), it processes the posted requests of every queue in
order and sends back one byte per queue it answered.  A wake-up with
nothing posted sends nothing.  Per queue and wake-up it handles at most the
two requests the double buffer can hold, whatever the doorbell claims.

The MH keeps its completion counters and layout in private memory: the
host may rewrite the shared descriptors at any time, and the MH reads only
the doorbell word from them.  Each request is copied out of its slot
before it is parsed (no double fetch).  Its memory is RAM below the
reservation (:mod:`.mh_layout`): its own mailbox is neither exported,
imported nor digested.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from pathlib import Path
from typing import Final

from vmmig.firmware.abi import (
    HEADER_SIZE,
    PAGE_SIZE,
    QUEUE_DESC_SIZE,
    REGION_HEADER_SIZE,
    Role,
)
from vmmig.firmware.cpus import GuestCpus
from vmmig.firmware.handler import MigrationHandler
from vmmig.firmware.image import (
    FIRMWARE_GPA,
    MH_CONFIG_GPA,
    MH_CONFIG_SIZE,
    MhLaunchConfig,
    builtin_image,
)
from vmmig.firmware.states import MhState, role_of
from vmmig.owner.secret_table import MIGRATION_SECRET_GUID, parse_secret_table
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.mh_layout import MhReservation
from vmmig.platforms.emu.qmp_schema import CommandTable, QmpCommandError
from vmmig.platforms.emu.sev_launch import SECRET_AREA
from vmmig.platforms.emu.shared_pages import SharedPages


__all__ = ["MhRuntime", "register_mh_commands"]

_log = logging.getLogger(__name__)

#: Least bytes of a master secret (ABI §4.1).
_MIN_SECRET: Final = 16
#: Bytes one wake-up message may carry (one queue index each).
_MAX_WAKE: Final = 64
_JOIN_TIMEOUT: Final = 5.0
_U64 = struct.Struct("<Q")
_STATES: Final = {MhState.TARGET_COMMITTED: "committed", MhState.SOURCE_RETIRED: "retired",
                  MhState.FAILED: "failed"}


def _error(message: str) -> QmpCommandError:
    return QmpCommandError("GenericError", f"MH: {message}")


class MhRuntime:
    """One SEV machine's MH: started by ``x-mh-start``, served by a helper-vCPU thread.

    :param memory: the machine's RAM (the MH uses the guest's view, ``memory.ram``).
    :param shared_pages: the conversion the MH shares its mailbox with.
    :param reservation: where the host reserved the mailbox (reported before start).
    :param irq_path: the interrupt socket to create at start.
    :param target: the machine was started as an MH migration target.
    """

    def __init__(self, memory: GuestMemory, shared_pages: SharedPages, *,
                 reservation: MhReservation, irq_path: Path, target: bool,
                 cpus: GuestCpus | None = None) -> None:
        self._memory = memory
        self._cpus = cpus
        self._shared_pages = shared_pages
        self.reservation = reservation
        self.irq_path = irq_path
        self.target = target
        self.handler: MigrationHandler | None = None
        self._crashed = False
        self._closing = False
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._completion = [0] * reservation.queue_count
        #: The private copy of the request being served (no double fetch), reused.
        self._request = memoryview(bytearray(reservation.layout.slot_capacity))

    # -- QMP ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``x-query-mh``'s state word."""
        if self._crashed:
            return "failed"
        if self.handler is None:
            return "stopped"
        return _STATES.get(self.handler.state, "running")

    def query(self) -> dict[str, object]:
        """``x-query-mh``."""
        role = Role.NONE if self.handler is None else role_of(self.handler.state)
        return {"state": self.state, "mailbox-gpa": self.reservation.mailbox_gpa,
                "mailbox-size": self.reservation.layout.region_size,
                "queues": self.reservation.queue_count, "irq-path": str(self.irq_path),
                "shared-path": str(self._memory.shared_path),
                "role": None if role is Role.NONE else role.name.lower()}

    def start(self) -> None:
        """``x-mh-start``: boot the MH on its helper vCPU (module doc)."""
        if self.handler is not None:
            raise _error("the helper vCPU is already running")
        ram = self._memory.ram
        try:
            config = MhLaunchConfig.unpack(ram[MH_CONFIG_GPA:MH_CONFIG_GPA + MH_CONFIG_SIZE])
        except ValueError as err:
            raise _error(f"{err}: this guest was not launched with one") from None
        image = builtin_image()
        if config.image_size != len(image) or \
                ram[FIRMWARE_GPA:FIRMWARE_GPA + len(image)] != image:
            raise _error(f"the firmware at {FIRMWARE_GPA:#x} is not vmmig's built-in Migration "
                         "Handler: the emulator can run only that one")
        reservation = self.reservation
        if (config.mailbox_gpa, config.queue_count) != (reservation.mailbox_gpa,
                                                        reservation.queue_count):
            raise _error("the measured launch configuration disagrees with this machine's "
                         "mailbox reservation")
        secret = self._master_secret()
        layout = reservation.layout
        gpa = reservation.mailbox_gpa
        pages = -(-layout.region_size // PAGE_SIZE)
        if self._shared_pages.map_gpa_range(gpa, pages, 0) != 0:
            raise _error(f"cannot share the mailbox pages at {gpa:#x}")
        ram[gpa:gpa + REGION_HEADER_SIZE] = layout.pack_header()
        for queue in range(layout.queue_count):
            offset = gpa + REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE
            ram[offset:offset + QUEUE_DESC_SIZE] = layout.pack_queue(queue)
        self.irq_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(self.irq_path))
        listener.listen(1)
        self._listener = listener
        self.handler = MigrationHandler(self._memory.pages[:gpa // PAGE_SIZE], secret,
                                        max_batch_pages=layout.max_batch_pages,
                                        roles=config.roles, cpus=self._cpus)
        self._thread = threading.Thread(target=self._serve, name="mh-helper-vcpu", daemon=True)
        self._thread.start()

    def _master_secret(self) -> bytes:
        """The migration master secret from the secret area; refuse to run without one."""
        start, size = SECRET_AREA
        try:
            entries = parse_secret_table(bytes(self._memory.ram[start:start + size]))
        except ValueError as err:
            raise _error(f"no secret in the secret area ({err}): the guest owner has not "
                         "injected it") from None
        secret = entries.get(MIGRATION_SECRET_GUID)
        if secret is None or len(secret) < _MIN_SECRET:
            raise _error("the secret table holds no migration master secret")
        return secret

    def check_may_run(self) -> None:
        """Refuse ``cont`` where running the guest here could fork it or run an unverified one."""
        state = None if self.handler is None else self.handler.state
        if self.target and state is not MhState.TARGET_COMMITTED:
            raise _error("this migration target runs only once its MH has committed an "
                         f"imported guest (MH state: {self.state})")
        if state is MhState.SOURCE_SEALED:
            raise _error("the source's manifest is out: it resumes only after the target's "
                         "abort token (ABORT)")
        if state is MhState.SOURCE_RETIRED:
            raise _error("the guest was committed on the migration target: this copy never "
                         "runs again")

    def register(self, commands: CommandTable) -> None:
        """Add ``x-mh-start`` and ``x-query-mh``."""
        commands.add("x-mh-start", self.start)
        commands.add("x-query-mh", self.query)

    # -- the helper vCPU -------------------------------------------------------------

    def _serve(self) -> None:
        """Accept one host at a time; every message is a wake-up."""
        listener = self._listener
        assert listener is not None
        try:
            while not self._closing:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed
                with conn:
                    self._conn = conn
                    self._serve_host(conn)
                    self._conn = None
        except Exception:  # a bug: the MH stops answering, and says so
            _log.exception("MH helper vCPU crashed")
            self._crashed = True

    def _serve_host(self, conn: socket.socket) -> None:
        while not self._closing:
            try:
                if not conn.recv(_MAX_WAKE):
                    return  # the host hung up
                for queue in self._service():
                    conn.send(bytes([queue]))
            except OSError:
                return

    def _service(self) -> list[int]:
        """Answer every posted request of every queue; the queues that advanced."""
        assert self.handler is not None
        ram, layout = memoryview(self._memory.ram), self.reservation.layout
        base = self.reservation.mailbox_gpa
        capacity = layout.slot_capacity
        request = self._request
        advanced = []
        for queue in range(layout.queue_count):
            descriptor = base + REGION_HEADER_SIZE + queue * QUEUE_DESC_SIZE
            (doorbell,) = _U64.unpack_from(ram, descriptor)
            done = self._completion[queue]
            # At most the two requests the double buffer holds, whatever the doorbell says.
            for seq in range(done + 1, min(doorbell, done + 2) + 1):
                slot = base + layout.slot_offset(queue, seq % 2)
                (length,) = struct.unpack_from("<I", ram, slot + 4)
                size = min(HEADER_SIZE + length, capacity)
                request[:size] = ram[slot:slot + size]  # into the reused private buffer
                # The response (a sealed record) goes straight into the slot.
                self.handler.handle_into(request[:size], ram[slot:slot + capacity])
                _U64.pack_into(ram, descriptor + 8, seq)
                self._completion[queue] = seq
            if self._completion[queue] != done:
                advanced.append(queue)
        return advanced

    def close(self) -> None:
        """Stop the helper vCPU and remove the interrupt socket."""
        self._closing = True
        for sock in (self._listener, self._conn):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
        self.handler = None  # its view of RAM would keep the mapping from closing
        if self._listener is not None:
            self._listener.close()
            self.irq_path.unlink(missing_ok=True)


def register_mh_commands(commands: CommandTable, runtime: MhRuntime | None) -> None:
    """Add the MH's commands; a machine without an MH (plain, PSP-incoming) refuses them."""
    if runtime is not None:
        runtime.register(commands)
        return

    def refuse() -> None:
        raise _error("this machine has no Migration Handler (sev and sev-es guests launched "
                     "with their owner's inputs have one)")

    commands.add("x-mh-start", refuse)
    commands.add("x-query-mh", refuse)
