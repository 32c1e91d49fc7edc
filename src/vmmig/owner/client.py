"""A remote guest owner: the client of ``vmmig owner serve``.

:class:`OwnerClient` has the launch operations of :class:`~vmmig.owner.GuestOwner`
with the same signatures and errors (an :class:`AttestationError` comes back
as itself), so whatever drives a launch takes either.  It is blocking, as the
owner is, keeps one connection, and serialises calls from several threads
(:func:`~vmmig.owner.attest_and_inject` calls it from a worker thread).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from vmmig.channel.stream import ChannelClosed, connect
from vmmig.errors import ConfigError, PlatformError
from vmmig.owner.expected import LaunchKind
from vmmig.owner.guest_owner import LaunchOffer, PlatformCerts
from vmmig.owner.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    OwnerProtocolError,
    attestation_error_from_json,
    certs_to_json,
    decode_line,
    encode_line,
    offer_from_json,
    packet_from_json,
)
from vmmig.platforms.emu.psp import FirmwareVersion, PlatformChain, SecretPacket
from vmmig.platforms.emu.psp.store import b64


__all__ = ["OwnerClient"]

_T = TypeVar("_T")


class OwnerClient:
    """The owner served at ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``).

    :param timeout: seconds for connecting and for each reply.
    """

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._lines: BinaryIO | None = None

    def __enter__(self) -> OwnerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (the next call connects again)."""
        if self._lines is not None:
            self._lines.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._lines = None

    def _connect(self) -> BinaryIO:
        if self._lines is not None:
            return self._lines
        try:
            sock = connect(self.address, self.timeout).sock
        except ValueError as err:
            raise ConfigError("owner", str(err)) from None
        except ChannelClosed as err:
            raise PlatformError(f"guest owner: {err}") from None
        sock.settimeout(self.timeout)
        self._sock, self._lines = sock, sock.makefile("rb")
        greeting = self._read().get("vmmig-owner")
        if not isinstance(greeting, dict) or greeting.get("version") != PROTOCOL_VERSION:
            self.close()
            raise PlatformError(f"{self.address} is not a vmmig guest owner of protocol "
                                f"version {PROTOCOL_VERSION}")
        return self._lines

    def _read(self) -> dict[str, Any]:
        assert self._lines is not None
        try:
            line = self._lines.readline(MAX_LINE + 1)
        except OSError as err:
            self.close()
            raise PlatformError(f"guest owner at {self.address}: {err}") from None
        if not line:
            self.close()
            raise PlatformError(f"guest owner at {self.address} closed the connection")
        try:
            return decode_line(line)
        except OwnerProtocolError as err:
            self.close()
            raise PlatformError(f"guest owner at {self.address}: {err}") from None

    def execute(self, operation: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Run one operation; its ``return`` value.

        :raises AttestationError: the owner refused.
        :raises PlatformError: the owner is unreachable, broke the protocol or failed.
        """
        with self._lock:
            self._connect()
            assert self._sock is not None
            try:
                self._sock.sendall(encode_line({"execute": operation, "arguments": arguments}))
            except OSError as err:
                self.close()
                raise PlatformError(f"guest owner at {self.address}: {err}") from None
            reply = self._read()
        if isinstance(reply.get("return"), dict):
            return reply["return"]  # type: ignore[no-any-return]
        error = reply.get("error")
        if not isinstance(error, dict):
            raise PlatformError(f"guest owner at {self.address} sent neither return nor error")
        if error.get("class") == "AttestationError":
            try:
                raise attestation_error_from_json(error)
            except OwnerProtocolError as err:
                raise PlatformError(f"guest owner at {self.address}: {err}") from None
        raise PlatformError(f"guest owner at {self.address}: {error.get('class')}: "
                            f"{error.get('desc')}")

    def start_launch(self, guest: str, platform: PlatformChain | PlatformCerts, *,
                     kind: LaunchKind = LaunchKind.BOOT) -> LaunchOffer:
        """See :meth:`vmmig.owner.GuestOwner.start_launch`."""
        reply = self.execute("start-launch", {"guest": guest, "kind": kind.value,
                                              **certs_to_json(platform)})
        return self._decoded(offer_from_json, reply)

    def release_secret(self, guest: str, session: str, measurement: bytes,
                       firmware: FirmwareVersion, *, platform_pdh: bytes | None = None
                       ) -> SecretPacket:
        """See :meth:`vmmig.owner.GuestOwner.release_secret`."""
        arguments: dict[str, Any] = {
            "guest": guest, "session": session, "measurement": b64(measurement),
            "api-major": firmware.api_major, "api-minor": firmware.api_minor,
            "build-id": firmware.build}
        if platform_pdh is not None:
            arguments["pdh"] = b64(platform_pdh)
        return self._decoded(packet_from_json, self.execute("release-secret", arguments))

    def _decoded(self, decode: Callable[[dict[str, Any]], _T], reply: dict[str, Any]) -> _T:
        try:
            return decode(reply)
        except OwnerProtocolError as err:
            raise PlatformError(f"guest owner at {self.address}: {err}") from None
