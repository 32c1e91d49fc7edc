"""A hostile host between the agents, for end-to-end tests; this module holds no tests.

:class:`HostileProxy` listens on loopback, connects to the target agent, and
forwards the channel both ways.  Source -> target it parses frames and may
attack the PAGES frames (the MHs' sealed records) the way a host that owns
the network can: it renumbers the channel's own frame sequence afterwards,
so the channel does not notice and only what the MHs check can catch it.
It records every byte it forwards.

:class:`ProxiedEmuPlatform` is the emulated platform with the proxy put in
front of the target agent; :func:`proxied_opener` opens one for
:func:`vmmig.runner.run_migration`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

import numpy as np

from vmmig.channel import FrameKind
from vmmig.channel.frames import FRAME_HEADER
from vmmig.firmware.envelope import ENTRY, RECORD_HEADER_SIZE
from vmmig.platforms.emu.platform import EmuPlatform


#: The attacks :class:`HostileProxy` knows: on PAGES frame ``at`` (0-based), or on the
#: CPU_STATE frames (``cpu-``: flip a bit of the first, replay it, swap the first two,
#: splice in another migration's first, drop the last).
ATTACKS = ("flip", "drop", "replay", "swap", "truncate", "splice",
           "cpu-flip", "cpu-replay", "cpu-swap", "cpu-splice", "cpu-drop")
_HEADER_SIZE = FRAME_HEADER.size


def read_exactly(sock: socket.socket, size: int) -> bytearray:
    """``size`` bytes from ``sock``; EOFError if it closes first."""
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _gpas(frame: bytearray) -> np.ndarray:
    """The GPA column of a PAGES frame's record entries (a writable view)."""
    (count,) = np.frombuffer(frame, "<u4", 1, _HEADER_SIZE + 48)
    entries = np.frombuffer(frame, ENTRY, int(count), _HEADER_SIZE + RECORD_HEADER_SIZE)
    return entries["gpa"]


class HostileProxy:
    """Forwards one channel connection; attacks PAGES frame ``at`` with ``attack``.

    :param target: the target agent's ``tcp:HOST:PORT``.
    :param attack: one of :data:`ATTACKS`, or None to forward faithfully.
    :param spliced: for ``splice``: the PAGES frame put in place of frame ``at``.
    :ivar pages: the PAGES frames seen, as received (a splice source for a later run).
    :ivar recorded: every byte forwarded source -> target and back.
    :ivar attacked: whether the attack took place.
    """

    def __init__(self, target: str, attack: str | None = None, at: int = 2,
                 spliced: bytes | None = None) -> None:
        _, host, port = target.split(":")
        self._target = (host, int(port))
        self.attack, self.at, self.spliced = attack, at, spliced
        self.pages: list[bytes] = []
        self.recorded = bytearray()
        self.attacked = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._sequence = 0
        self._held: bytearray | None = None
        self._trailer: list[bytearray] = []
        self._held_cpu: list[bytearray] = []
        #: The CPU_STATE frames seen, as received.
        self.cpu_states: list[bytes] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            source, _ = self._listener.accept()
            target = socket.create_connection(self._target)
            self._socks += [source, target]
            back = threading.Thread(target=self._backward, args=(target, source), daemon=True)
            back.start()
            with contextlib.suppress(EOFError, OSError):
                self._forward(source, target)
            # Let what the target said reach the source, then hang up on both: a shut
            # but open socket would leave a sending source blocked for ever.
            back.join(10)
            self._shut()
            for sock in self._socks:
                sock.close()

    def _send(self, target: socket.socket, frame: bytearray) -> None:
        """Forward ``frame`` with the channel's next sequence number."""
        FRAME_HEADER.pack_into(frame, 0, *FRAME_HEADER.unpack_from(frame)[:4], self._sequence)
        self._sequence += 1
        self.recorded += frame
        target.sendall(frame)

    def _forward(self, source: socket.socket, target: socket.socket) -> None:
        while True:
            header = read_exactly(source, _HEADER_SIZE)
            kind, length = FRAME_HEADER.unpack(header)[2:4]
            frame = header + read_exactly(source, length)
            if self.attack == "truncate":
                self._truncating(target, kind, frame)
            elif kind == FrameKind.PAGES:
                self._pages_frame(target, frame)
            elif kind == FrameKind.CPU_STATE:
                self._cpu_frame(target, frame)
            else:
                self._flush_cpu(target)
                self._send(target, frame)

    def _cpu_frame(self, target: socket.socket, frame: bytearray) -> None:
        """The vCPU-state attacks, on the stream's CPU_STATE frames (SEV-ES)."""
        index = len(self.cpu_states)
        self.cpu_states.append(bytes(frame))
        attack = self.attack or ""
        if not attack.startswith("cpu-"):
            self._send(target, frame)
        elif attack == "cpu-flip" and index == 0:
            self.attacked = True
            frame[len(frame) // 2] ^= 0x10  # a register's bits, in transit
            self._send(target, frame)
        elif attack == "cpu-replay" and index == 0:
            self.attacked = True
            self._send(target, frame)
            self._send(target, bytearray(frame))
        elif attack == "cpu-swap" and index == 0:
            self._held = frame  # goes after the next one
        elif attack == "cpu-swap" and index == 1 and self._held is not None:
            self.attacked = True
            self._send(target, frame)
            self._send(target, self._held)
            self._held = None
        elif attack == "cpu-splice" and index == 0:
            assert self.spliced is not None, "splice needs a frame of another migration"
            self.attacked = True
            self._send(target, bytearray(self.spliced))
        elif attack == "cpu-drop":
            self._held_cpu.append(frame)  # the last one is dropped when the stream ends
        else:
            self._send(target, frame)

    def _flush_cpu(self, target: socket.socket) -> None:
        """The CPU_STATE frames are over: send the ones held back but the last."""
        if self._held_cpu:
            for frame in self._held_cpu[:-1]:
                self._send(target, frame)
            self._held_cpu = []
            self.attacked = True

    def _truncating(self, target: socket.socket, kind: int, frame: bytearray) -> None:
        """Hold the latest record and what follows it; at CPU_STATE it was the stream's
        last, and goes nowhere."""
        if kind == FrameKind.PAGES:
            self.pages.append(bytes(frame))
            for held in self._trailer:
                self._send(target, held)
            self._trailer = [frame]
        elif kind == FrameKind.CPU_STATE and self._trailer:
            for held in self._trailer[1:]:
                self._send(target, held)
            self._trailer = []
            self.attacked = True
            self._send(target, frame)
        elif self._trailer:
            self._trailer.append(frame)
        else:
            self._send(target, frame)

    def _pages_frame(self, target: socket.socket, frame: bytearray) -> None:
        index = len(self.pages)
        self.pages.append(bytes(frame))
        if index == self.at and self.attack == "swap":
            self._held = frame  # swapped with the next one, then both go in order
            return
        if index == self.at + 1 and self._held is not None:
            first, second = _gpas(self._held), _gpas(frame)
            first[:], second[:] = second.copy(), first.copy()
            self.attacked = True
            self._send(target, self._held)
            self._held = None
        elif index == self.at and self.attack in ("flip", "drop", "replay", "splice"):
            self._attack(target, frame)
            return
        self._send(target, frame)

    def _attack(self, target: socket.socket, frame: bytearray) -> None:
        self.attacked = True
        if self.attack == "flip":
            frame[len(frame) // 2] ^= 0x04
            self._send(target, frame)
        elif self.attack == "replay":
            self._send(target, frame)
            self._send(target, bytearray(frame))
        elif self.attack == "splice":
            assert self.spliced is not None, "splice needs a frame of another migration"
            self._send(target, bytearray(self.spliced))
        # "drop": nothing goes

    def _backward(self, target: socket.socket, source: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := target.recv(1 << 16):
                self.recorded += chunk
                source.sendall(chunk)
        self._shut()  # ends the forward direction too

    def _shut(self) -> None:
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        self._shut()
        self._thread.join(10)


class ProxiedEmuPlatform(EmuPlatform):
    """The emulated platform whose source agent reaches the target through a proxy.

    ``make_proxy(target_address)`` builds the proxy; ``proxies`` keeps them.
    """

    make_proxy: Callable[[str], HostileProxy] = HostileProxy
    proxies: list[HostileProxy]

    async def start_agent(self, role, machine, address, options=()):
        if role == "source":
            proxy = type(self).make_proxy(address)
            self.proxies.append(proxy)
            address = proxy.address
        return await super().start_agent(role, machine, address, options)


def proxied_platform(make_proxy: Callable[[str], HostileProxy]) -> type[ProxiedEmuPlatform]:
    """A platform class whose runs go through proxies made by ``make_proxy``."""
    return type("Proxied", (ProxiedEmuPlatform,),
                {"make_proxy": staticmethod(make_proxy), "proxies": []})
