"""``vmmig owner serve``: the guest owner as a service, one JSON line per request.

The protocol is :mod:`.protocol`'s.  One asyncio task per connection reads a
line, runs the operation on the one :class:`~vmmig.owner.GuestOwner` and
writes one line back; operations take milliseconds (an ECDH, a few RSA and
ECDSA verifications, HMACs), so they run on the event loop itself, one at a
time, and the owner needs no locking.  A connection that sends an overlong
or malformed line gets a ``ProtocolError`` and is closed; one idle for
:data:`IDLE_TIMEOUT` seconds is closed; beyond :data:`MAX_CONNECTIONS`
concurrent ones, a new connection gets an error and is closed.

Expectations are not an operation: what a guest must launch as is the
tenant's to say, with ``vmmig owner expect`` on the owner's own machine,
never something a (host-side) client of this service may set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from vmmig.channel.stream import listen
from vmmig.errors import ConfigError, VmmigError
from vmmig.owner.errors import AttestationError
from vmmig.owner.guest_owner import GuestOwner
from vmmig.owner.protocol import (
    MAX_LINE,
    OPERATIONS,
    PROTOCOL_VERSION,
    OwnerProtocolError,
    certs_from_json,
    decode_line,
    encode_line,
    error_to_json,
    firmware_from_json,
    get_bytes,
    get_str,
    kind_from_json,
    offer_to_json,
    packet_to_json,
)


__all__ = ["IDLE_TIMEOUT", "MAX_CONNECTIONS", "handle_request", "serve_owner"]

logger = logging.getLogger(__name__)

#: Seconds a connection may stay silent before the server closes it.
IDLE_TIMEOUT: Final = 300.0
#: Concurrent connections served; more are refused.
MAX_CONNECTIONS: Final = 64


def handle_request(owner: GuestOwner, message: dict[str, Any]) -> dict[str, Any]:
    """One request's response (a ``return`` or an ``error``); never raises a VmmigError."""
    try:
        return {"return": _dispatch(owner, message)}
    except (AttestationError, OwnerProtocolError, ConfigError) as err:
        return error_to_json(err)
    except VmmigError as err:
        logger.error("owner failed: %s", err)  # noqa: TRY400 (one line, as the CLI's errors)
        return {"error": {"class": "OwnerError", "desc": str(err)}}


def _dispatch(owner: GuestOwner, message: dict[str, Any]) -> dict[str, Any]:
    operation = message.get("execute")
    arguments = message.get("arguments", {})
    if not isinstance(arguments, dict):
        raise OwnerProtocolError("arguments must be a JSON object")
    if operation == "start-launch":
        return offer_to_json(owner.start_launch(get_str(arguments, "guest"),
                                                certs_from_json(arguments),
                                                kind=kind_from_json(arguments)))
    if operation == "release-secret":
        pdh = get_bytes(arguments, "pdh") if "pdh" in arguments else None
        return packet_to_json(owner.release_secret(
            get_str(arguments, "guest"), get_str(arguments, "session"),
            get_bytes(arguments, "measurement"), firmware_from_json(arguments),
            platform_pdh=pdh))
    raise OwnerProtocolError(f"unknown operation {operation!r}; "
                             f"this owner serves {', '.join(OPERATIONS)}")


class _Server:
    """The connections of one serving owner."""

    def __init__(self, owner: GuestOwner) -> None:
        self.owner = owner
        self.connections = 0

    async def connection(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                writer.write(encode_line(error_to_json(OwnerProtocolError(
                    f"the owner serves at most {MAX_CONNECTIONS} connections"))))
                return
            writer.write(encode_line({"vmmig-owner": {"version": PROTOCOL_VERSION,
                                                      "operations": list(OPERATIONS)}}))
            while await self._one(reader, writer):
                pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.connections -= 1
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        await writer.drain()
        try:
            line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
        except ValueError:  # longer than the reader's limit
            writer.write(encode_line(error_to_json(OwnerProtocolError(
                f"a message is one line of at most {MAX_LINE} bytes"))))
            return False
        if not line:
            return False
        try:
            message = decode_line(line)
        except OwnerProtocolError as err:
            writer.write(encode_line(error_to_json(err)))
            return False
        writer.write(encode_line(handle_request(self.owner, message)))
        return True


async def serve_owner(owner: GuestOwner, address: str,
                      ready: Callable[[str], None] | None = None) -> None:
    """Serve ``owner`` on ``address`` (``unix:PATH`` or ``tcp:HOST:PORT``) until SIGTERM/SIGINT.

    :param ready: called with the address once connections are accepted.
    :raises ConfigError: the address is malformed or cannot be bound.
    """
    try:
        sock = listen(address)
    except ValueError as err:
        raise ConfigError("listen", str(err)) from None
    except OSError as err:
        raise ConfigError("listen", f"cannot listen on {address}: {err.strerror}") from None
    unix_path = Path(address.partition(":")[2]) if address.startswith("unix:") else None
    server = await asyncio.start_server(_Server(owner).connection, sock=sock, limit=MAX_LINE)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with server:
            if ready is not None:
                ready(address)
            await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)
