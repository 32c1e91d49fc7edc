"""Frames over a connected stream socket, counting bytes, without copying pages.

Blocking sockets on purpose: an agent's data path is one loop per direction,
and plain ``sendmsg``/``recv_into`` reached 5 GB/s on loopback here, more
than asyncio streams (machine-facts).  Flow control is TCP's own: ``send``
blocks while the peer's window is full.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any

from vmmig.channel.frames import FRAME_HEADER, MAX_PAYLOAD, FrameHeader, FrameKind, ProtocolError
from vmmig.errors import VmmigError


if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Channel", "ChannelClosed", "connect", "listen"]


SOCKET_BUFFER = 4 << 20


class ChannelClosed(VmmigError):
    """The peer closed the channel (or it broke) before a whole frame arrived."""


class Channel:
    """One end of an agent-to-agent channel.

    :param sock: a connected stream socket (TCP or Unix); the channel owns it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Room for a few 1 MiB page batches in flight: fewer, larger system calls.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._send_sequence = 0
        self._receive_sequence = 0
        self._header = bytearray(FRAME_HEADER.size)
        self._buffer = bytearray(1 << 20)

    def send(self, kind: FrameKind, *parts: Buffer) -> None:
        """Send one frame whose payload is ``parts`` concatenated (gathered, not copied)."""
        views = [memoryview(part).cast("B") for part in parts]
        length = sum(view.nbytes for view in views)
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
        header = FrameHeader(kind, length, self._send_sequence).pack()
        self._sendmsg([memoryview(header), *views])
        self._send_sequence += 1
        self.bytes_sent += len(header) + length

    def send_json(self, kind: FrameKind, message: dict[str, Any]) -> None:
        """Send a frame whose payload is a JSON object."""
        self.send(kind, json.dumps(message).encode())

    def receive_header(self) -> FrameHeader:
        """Receive the next frame's header; the payload must be received next."""
        self.receive_into(memoryview(self._header))
        header = FrameHeader.unpack(self._header, expected_sequence=self._receive_sequence)
        self._receive_sequence += 1
        return header

    def receive_payload(self, header: FrameHeader, into: memoryview | None = None) -> memoryview:
        """Receive ``header``'s payload into ``into`` (or a reused internal buffer).

        The returned view of the internal buffer is valid until the next receive.
        """
        if into is None:
            if len(self._buffer) < header.length:
                self._buffer = bytearray(header.length)
            into = memoryview(self._buffer)
        if into.nbytes < header.length:
            raise ProtocolError(f"frame of {header.length} bytes does not fit a "
                                f"{into.nbytes}-byte buffer")
        target = into[:header.length]
        self.receive_into(target)
        return target

    def receive(self) -> tuple[FrameHeader, memoryview]:
        """Receive a whole frame into the internal buffer."""
        header = self.receive_header()
        return header, self.receive_payload(header)

    def receive_json(self) -> tuple[FrameKind, dict[str, Any]]:
        """Receive a frame whose payload is a JSON object."""
        header, payload = self.receive()
        try:
            message = json.loads(bytes(payload))
        except ValueError as err:
            raise ProtocolError(f"{header.kind.name} frame is not JSON: {err}") from None
        if not isinstance(message, dict):
            raise ProtocolError(f"{header.kind.name} frame is not a JSON object")
        return header.kind, message

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _sendmsg(self, views: list[memoryview]) -> None:
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if views and sent:
                    views[0] = views[0][sent:]
        except OSError as err:
            raise ChannelClosed(f"channel broke while sending: {err.strerror or err}") from err

    def receive_into(self, target: memoryview) -> None:
        """Receive exactly ``target.nbytes`` bytes of the current frame's payload.

        For receivers that place a payload's parts where they belong (pages
        straight into guest RAM): after :meth:`receive_header`, read the
        whole payload in parts with this, or with :meth:`receive_payload`.
        """
        got = 0
        while got < target.nbytes:
            try:
                n = self.sock.recv_into(target[got:])
            except OSError as err:
                raise ChannelClosed(f"channel broke while receiving: {err.strerror or err}"
                                    ) from err
            if n == 0:
                where = "between frames" if got == 0 and target.nbytes == FRAME_HEADER.size \
                    else f"{target.nbytes - got} bytes short of a whole frame"
                raise ChannelClosed(f"the peer closed the channel {where}")
            got += n
        self.bytes_received += got


def listen(address: str) -> socket.socket:
    """A listening socket for ``tcp:HOST:PORT`` (port 0: any) or ``unix:PATH``."""
    family, target = _parse(address)
    server = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(target)
    server.listen(1)
    return server


def connect(address: str, timeout: float = 30.0) -> Channel:
    """Connect to ``tcp:HOST:PORT`` or ``unix:PATH``.

    :raises ChannelClosed: naming the address when the connection is refused.
    """
    family, target = _parse(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as err:
        sock.close()
        raise ChannelClosed(f"cannot connect to {address}: {err.strerror or err}") from err
    sock.settimeout(None)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Channel(sock)


def _parse(address: str) -> tuple[socket.AddressFamily, Any]:
    scheme, _, rest = address.partition(":")
    if scheme == "unix" and rest:
        return socket.AF_UNIX, rest
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit():
            return socket.AF_INET, (host, int(port))
    raise ValueError(f"expected tcp:HOST:PORT or unix:PATH, got {address!r}")
