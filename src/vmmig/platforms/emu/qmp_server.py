"""The emulated machine's control endpoint: QMP, QEMU's monitor protocol, on a Unix socket.

The machine serves QMP so that vmmig drives ``emu`` machines and QEMU with
the same :class:`qemu.qmp.QMPClient` code. :class:`QmpServer` speaks the
protocol of QEMU's ``docs/interop/qmp-spec.rst``:

- On connect it sends the greeting, with QEMU version 0.0.0 (this is not a
  QEMU; ``package`` says ``vmmig-emu <version>``) and no capabilities.
- Until the client runs ``qmp_capabilities`` every other command fails with
  ``CommandNotFound``, as in QEMU. Then the client may run the commands of
  the server's :class:`~vmmig.platforms.emu.qmp_schema.CommandTable` and the
  built-ins ``qmp_capabilities``, ``query-commands``, ``query-version`` and
  ``quit``.
- Replies echo the request's ``id``. Errors carry QEMU's error classes and,
  for protocol and argument errors, QEMU's descriptions. Malformed input
  (bad JSON, a JSON value that is no object, a request without ``execute``)
  is answered with an error and the connection goes on.
- :meth:`QmpServer.emit` sends an event to every client past negotiation.
- A command that fails unexpectedly is logged and answered with a
  ``GenericError``; the server and the connection carry on.

Where it differs from QEMU, on purpose:

- Several clients may be connected at once (QEMU serves one per monitor);
  each negotiates on its own and all receive events. Commands still run one
  at a time across all clients, as on QEMU's main loop, so a handler need
  not be re-entrant; a handler that waits holds up every client.
- A request longer than :data:`MAX_REQUEST` bytes is refused and the
  client disconnected (QEMU resets its parser and reads on, in the middle
  of the request).
- No out-of-band execution (``exec-oob`` is refused) and no ``getfd``: the
  server takes no file descriptors from clients.
- A reply may pass file descriptors *to* the client (below).

Passing file descriptors
------------------------

A handler returns :class:`~vmmig.platforms.emu.qmp_schema.WithFds` to send
descriptors (the machine's shared-memory segment, say) with its reply, as
``SCM_RIGHTS`` ancillary data on the reply's first bytes. qemu.qmp cannot
receive them: its reader uses plain ``recv``, so the kernel discards the
descriptors it is sent, while the reply itself arrives normally. An agent
therefore fetches a descriptor over a second, short-lived connection with
:func:`receive_fd_command` (blocking; run it with :func:`asyncio.to_thread`)
and keeps its qemu.qmp connection for everything else. This is the
recommended way. The alternatives are worse:

- A path (a file in ``/dev/shm``, like QEMU's ``memory-backend-file``): works
  with any client, but the file outlives a machine killed by SIGKILL, and
  anyone who can open the path can map guest memory.
- ``/proc/<pid>/fd/<n>`` or ``pidfd_getfd``: no file name, but needs ptrace
  access to the machine, which Yama or a container may deny.
- Reading ancillary data from qemu.qmp's own socket: its reader task
  consumes the bytes, and with them the descriptors.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import inspect
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

from vmmig import __version__
from vmmig.errors import PlatformError
from vmmig.platforms.emu.qmp_schema import (
    BUILTIN_COMMANDS,
    Command,
    CommandTable,
    QmpCommandError,
    WithFds,
)


__all__ = [
    "BUILTIN_COMMANDS",
    "CommandTable",
    "QmpCommandError",
    "QmpServer",
    "WithFds",
    "receive_fd_command",
]

logger = logging.getLogger(__name__)

#: ``query-version``'s answer and the greeting's ``version``: 0.0.0 is no QEMU.
VERSION_INFO: dict[str, object] = {
    "qemu": {"micro": 0, "minor": 0, "major": 0},
    "package": f"vmmig-emu {__version__}",
}

#: Longest request accepted, in bytes (QEMU allows 64 MiB tokens).
MAX_REQUEST = 16 << 20
#: Replies stop being produced while more than this many bytes wait for a client.
_HIGH_WATER = 1 << 20
#: Bytes read from a client at a time.
_READ_SIZE = 1 << 16
#: Seconds queued output may take to reach a client that is being disconnected.
_LINGER = 1.0
#: Seconds to wait before accepting again after accept() failed (EMFILE, ...).
_ACCEPT_BACKOFF = 0.1
#: Longest path a Unix socket address holds (108 bytes with the final NUL).
_MAX_SOCKET_PATH = 107
#: Most descriptors :func:`receive_fd_command` takes from one read.
_MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize

#: Where a request starts; what ends a top-level token; what matters out of and in strings.
_NOT_SPACE = re.compile(rb"[^ \t\r\n]")
_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]"]')
_STRUCTURE = re.compile(rb'[{}\[\]"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_QUOTE, _BACKSLASH = ord('"'), ord("\\")

# ASCII, so that any Python string, even a lone surrogate from a \u escape, can be sent.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _encode(message: object) -> bytes:
    # QEMU ends every message with CRLF.
    return _ENCODER.encode(message).encode() + b"\r\n"


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _refuse_constant(name: str) -> NoReturn:
    # Python reads NaN and Infinity, which are not JSON and QEMU refuses.
    raise ValueError(f"invalid keyword '{name}'")


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                            parse_constant=_refuse_constant)


def _decode(value: bytes) -> dict[str, object]:
    """Parse one request into a JSON object.

    :raise QmpCommandError: QEMU's ``JSON parse error, ...``, or the value is no object.
    """
    try:
        request = _DECODER.decode(value.decode())
    except json.JSONDecodeError as err:
        where = f"column {err.colno}"
        message = err.msg[:1].lower() + err.msg[1:]
        reason = f"{message} {where}" if message.endswith(" at") else f"{message} at {where}"
    except UnicodeDecodeError:
        reason = "invalid UTF-8 sequence"
    except RecursionError:
        reason = "too deeply nested"
    except ValueError as err:  # from the two hooks above
        reason = str(err)
    else:
        if isinstance(request, dict):
            return request
        raise QmpCommandError("GenericError", "QMP input must be a JSON object")
    raise QmpCommandError("GenericError", f"JSON parse error, {reason}")


def _check_request(request: dict[str, object]) -> tuple[str, Mapping[str, object]]:
    """Check a request's members as QEMU's ``qmp_dispatch_check_obj`` does.

    :return: the command name and its arguments.
    :raise QmpCommandError: a member is missing, wrong or unexpected.
    """
    name: str | None = None
    arguments: Mapping[str, object] = {}
    for member, value in request.items():
        if member == "execute":
            if not isinstance(value, str):
                raise QmpCommandError("GenericError", "QMP input member 'execute' must be a string")
            name = value
        elif member == "arguments":
            if not isinstance(value, dict):
                raise QmpCommandError("GenericError",
                                      "QMP input member 'arguments' must be an object")
            arguments = value
        elif member == "exec-oob":
            raise QmpCommandError("GenericError", "QMP input member 'exec-oob' is unexpected: "
                                                  "this server has no out-of-band execution")
        elif member != "id":
            raise QmpCommandError("GenericError", f"QMP input member '{member}' is unexpected")
    if name is None:
        raise QmpCommandError("GenericError", "QMP input lacks member 'execute'")
    return name, arguments


def _error(error_class: str, desc: str, echo: Mapping[str, object]) -> bytes:
    return _encode({"error": {"class": error_class, "desc": desc}, **echo})


def _describe(err: Exception) -> str:
    """One line saying what went wrong, for a client that cannot see the log."""
    detail = str(err).strip().splitlines()
    return f"{type(err).__name__}: {detail[0]}" if detail else type(err).__name__


def _dup_all(fds: Iterable[int]) -> tuple[int, ...]:
    """Duplicate ``fds`` (all of them or, if one is bad, none)."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(os.dup(fd))
    except OSError:
        _close_all(copies)
        raise
    return tuple(copies)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


class _RequestTooLarge(Exception):
    """A request exceeded :data:`MAX_REQUEST` bytes."""


class _Session:
    """One client connection: its negotiation state, its input, its output queue.

    Requests are cut out of the input as QEMU's JSON streamer does: a value
    ends where its outermost bracket closes (qemu.qmp sends no newline
    after a request), a top-level string at its closing quote, and any other
    top-level token at the next whitespace or bracket.

    Output is written straight to the non-blocking socket, and queued only
    when the socket is full; owning the socket rather than going through an
    asyncio transport is what lets a reply carry descriptors without
    overtaking output queued before it.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.negotiated = False
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._inbox = bytearray()
        #: Where scanning of the incomplete request at the inbox's start resumes.
        self._scanned = 0
        #: Its brackets open so far, and whether the scan stopped inside a string.
        self._depth = 0
        self._in_string = False
        #: Messages not yet sent in full; descriptors go with a message's first byte.
        self._outbox: deque[tuple[memoryview, tuple[int, ...]]] = deque()
        self._queued = 0
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._watching = False
        self._closed = False

    async def read_request(self) -> bytes | None:
        """Return the next request's bytes, ``None`` at end of stream.

        :raise _RequestTooLarge: the request exceeds :data:`MAX_REQUEST` bytes.
        """
        while (request := self._cut_request()) is None:
            if len(self._inbox) > MAX_REQUEST:
                raise _RequestTooLarge
            try:
                chunk = await self._loop.sock_recv(self._sock, _READ_SIZE)
            except OSError:  # reset by the peer, or shut down by abort()
                return None
            if not chunk:
                return None
            self._inbox += chunk
        return request

    def _cut_request(self) -> bytes | None:
        """Remove the first complete JSON value from the inbox, ``None`` if it is incomplete."""
        inbox = self._inbox
        if self._scanned == 0:
            start = _NOT_SPACE.search(inbox)
            del inbox[:start.start() if start else len(inbox)]
            if not inbox:
                return None
            if inbox[0] not in b'{["':
                return self._cut_token()
        end = self._scan()
        return None if end is None else self._cut(end)

    def _cut_token(self) -> bytes | None:
        """Cut a bare top-level token (a scalar, or garbage the parser will name)."""
        if self._inbox[0] in b"}]":  # a stray closer is refused at once, as QEMU does
            return self._cut(1)
        end = _TOKEN_END.search(self._inbox, 1)
        return None if end is None else self._cut(end.start())

    def _scan(self) -> int | None:
        """Resume scanning the object, array or string at the inbox's start; return its end."""
        inbox, pos = self._inbox, self._scanned
        while True:
            found = (_STRING_SPECIAL if self._in_string else _STRUCTURE).search(inbox, pos)
            if found is None:
                self._scanned = len(inbox)
                return None
            char, pos = inbox[found.start()], found.end()
            if char == _BACKSLASH:
                if pos == len(inbox):  # the escaped byte has yet to arrive
                    self._scanned = found.start()
                    return None
                pos += 1
            elif char == _QUOTE:
                self._in_string = not self._in_string
                if not self._in_string and self._depth == 0:
                    return pos
            elif char in b"{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    return pos

    def _cut(self, end: int) -> bytes:
        request = bytes(self._inbox[:end])
        del self._inbox[:end]
        self._scanned = 0
        return request

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        """Send one message now or, if the socket is full, as soon as it drains.

        :param data: the encoded message.
        :param fds: descriptors to pass with it; this session closes them.
        """
        if self._closed:
            _close_all(fds)
            return
        self._outbox.append((memoryview(data), fds))
        self._queued += len(data)
        if not self._watching:
            self._flush()

    async def drain(self) -> None:
        """Wait while too much output is queued, so a client that does not read gets no more."""
        if self._queued > _HIGH_WATER:
            await self._flushed.wait()

    def abort(self) -> None:
        """Drop the connection now, with whatever output is still queued."""
        if self._closed:
            return
        self._closed = True
        for _, fds in self._outbox:
            _close_all(fds)
        self._outbox.clear()
        self._queued = 0
        self._watch(pending=False)
        # Wakes read_request(), which then sees the end of the stream.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    async def close(self) -> None:
        """Send what is queued (for a short while at most), then close the socket."""
        if self._outbox:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_LINGER):
                    await self._flushed.wait()
        self.abort()
        self._sock.close()

    def _flush(self) -> None:
        """Write queued messages until the socket is full; called again when it drains."""
        while self._outbox:
            data, fds = self._outbox[0]
            try:
                if fds:
                    rights = array.array("i", fds)
                    sent = self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                        rights)])
                else:
                    sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:
                logger.debug("QMP client gone while sending: %s", err)
                self.abort()
                return
            _close_all(fds)
            self._queued -= sent
            if sent == len(data):
                self._outbox.popleft()
            else:
                self._outbox[0] = (data[sent:], ())
        self._watch(pending=bool(self._outbox))

    def _watch(self, *, pending: bool) -> None:
        if pending and not self._watching:
            self._loop.add_writer(self._sock, self._flush)
            self._flushed.clear()
        elif not pending and self._watching:
            self._loop.remove_writer(self._sock)
            self._flushed.set()
        self._watching = pending


class QmpServer:
    """A QMP server on a Unix socket, serving the commands of a :class:`CommandTable`.

    ::

        server = QmpServer(commands, on_quit=shutdown_requested.set)
        await server.start(workdir / "vm.qmp")
        ...
        server.emit("STOP")
        ...
        await server.close()

    :param commands: the machine's commands; the built-ins come on top. The
        table is read on every request, so commands added later are served.
    :param on_quit: called by ``quit`` before it replies. It should only
        *request* the shutdown (set an event, say): the machine then
        shuts down and calls :meth:`close`, which a handler must never await.
    """

    def __init__(self, commands: CommandTable, *, on_quit: Callable[[], None]) -> None:
        self._commands = commands
        self._on_quit = on_quit
        self._builtins = {
            name: Command.from_handler(name, handler) for name, handler in (
                ("qmp_capabilities", self._qmp_capabilities),
                ("query-commands", self._query_commands),
                ("query-version", self._query_version),
                ("quit", self._quit),
            )
        }
        # One command at a time across all clients, as on QEMU's main loop.
        self._busy = asyncio.Lock()
        self._sessions: dict[_Session, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        #: The socket file this server created, with its (st_dev, st_ino).
        self._socket_file: tuple[Path, int, int] | None = None
        self._greeting = _encode({"QMP": {"version": VERSION_INFO, "capabilities": []}})

    @property
    def clients(self) -> int:
        """The number of clients connected now."""
        return len(self._sessions)

    async def start(self, address: str | os.PathLike[str] | socket.socket) -> None:
        """Start accepting clients.

        :param address: the path of the socket to create, or a bound,
            listening ``AF_UNIX`` stream socket (say, created by the process
            that launched the machine, so that it can connect at once). The
            server owns the socket from now on.
        :raise PlatformError: the socket cannot be created (the path exists,
            its directory does not, it is too long).
        """
        if self._listener is not None:
            raise RuntimeError("the QMP server is started already")
        listener = address if isinstance(address, socket.socket) else self._listen(Path(address))
        listener.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._listener = listener
        self._accepting = self._loop.create_task(self._accept(listener))

    async def close(self) -> None:
        """Stop listening, disconnect every client and remove the socket file.

        Output already queued for a client (say, a last event) is given a
        second to get through. Commands still running are cancelled.
        Idempotent.
        """
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
        if self._socket_file is not None:
            path, device, inode = self._socket_file
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                # Not the file of a newer server that took over the path.
                if (info.st_dev, info.st_ino) == (device, inode):
                    path.unlink()
            self._socket_file = None
        tasks = list(self._sessions.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        # A task cancelled before it started never ran its cleanup.
        for session in list(self._sessions):
            del self._sessions[session]
            await session.close()
        self._loop = None

    async def __aenter__(self) -> QmpServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def emit(self, event: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every client that completed negotiation.

        The timestamp is taken now. Safe to call from any thread (a vCPU's,
        say); from another thread the event is sent by the server's loop
        soon after. Without clients, or once the server is closed, the event
        is dropped, as QEMU drops events nobody listens to.

        :param event: the event name, QEMU's where QEMU has one (``STOP``).
        :param data: the event's ``data`` member; none when ``None``, as in QEMU.
        :raise TypeError: ``data`` is not JSON.
        """
        seconds, microseconds = divmod(time.time_ns() // 1000, 1_000_000)
        message: dict[str, object] = {
            "event": event, "timestamp": {"seconds": seconds, "microseconds": microseconds},
        }
        if data is not None:
            message["data"] = data
        # Encoded at once: the caller may change ``data`` afterwards.
        encoded = _encode(message)
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._broadcast(encoded)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._broadcast, encoded)

    # -- Internals -------------------------------------------------------------------

    def _listen(self, path: Path) -> socket.socket:
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise PlatformError(f"cannot serve QMP on {path}: too long a path for a Unix socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(os.fspath(path))
            listener.listen()
            info = path.stat()
        except OSError as err:
            listener.close()
            raise PlatformError(f"cannot serve QMP on {path}: {err.strerror}") from err
        self._socket_file = (path, info.st_dev, info.st_ino)
        return listener

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as err:  # out of descriptors, say: keep serving the clients we have
                logger.warning("QMP server cannot accept a client: %s", err)
                await asyncio.sleep(_ACCEPT_BACKOFF)
                continue
            session = _Session(sock)
            self._sessions[session] = loop.create_task(self._serve(session))

    async def _serve(self, session: _Session) -> None:
        logger.debug("QMP client connected (%d now)", len(self._sessions))
        try:
            session.send(self._greeting)
            while True:
                try:
                    request = await session.read_request()
                except _RequestTooLarge:
                    session.send(_error("GenericError", "JSON parse error, request longer than "
                                                        f"{MAX_REQUEST} bytes", {}))
                    break
                if request is None or not await self._execute(session, request):
                    break
                await session.drain()
        finally:
            self._sessions.pop(session, None)
            await session.close()
            logger.debug("QMP client disconnected")

    async def _execute(self, session: _Session, request_bytes: bytes) -> bool:
        """Run one request and send its reply.

        :return: whether to read further requests (not after ``quit``).
        """
        echo: dict[str, object] = {}
        name = None
        try:
            request = _decode(request_bytes)
            if "id" in request:
                echo["id"] = request["id"]
            name, arguments = _check_request(request)
            command = self._find(session, name)
            kwargs = command.bind(arguments)
            async with self._busy:
                result = command.handler(**kwargs)
                if inspect.isawaitable(result):
                    result = await result
            value, fds = (result.value, result.fds) if isinstance(result, WithFds) else (result, ())
            reply = _encode({"return": {} if value is None else value, **echo})
            session.send(reply, _dup_all(fds))
        except QmpCommandError as err:
            session.send(_error(err.error_class, err.desc, echo))
            return True
        except Exception as err:
            logger.exception("QMP command %s failed", name)
            session.send(_error("GenericError", f"{name} failed: {_describe(err)}", echo))
            return True
        if name == "qmp_capabilities":
            session.negotiated = True
        return name != "quit"

    def _find(self, session: _Session, name: str) -> Command:
        if not session.negotiated:
            if name != "qmp_capabilities":
                raise QmpCommandError("CommandNotFound",
                                      "Expecting capabilities negotiation with 'qmp_capabilities'")
        elif name == "qmp_capabilities":
            raise QmpCommandError("CommandNotFound",
                                  "Capabilities negotiation is already complete, command ignored")
        command = self._builtins.get(name) or self._commands.get(name)
        if command is None:
            raise QmpCommandError("CommandNotFound", f"The command {name} has not been found")
        return command

    def _broadcast(self, encoded: bytes) -> None:
        for session in self._sessions:
            if session.negotiated:
                session.send(encoded)

    # -- Built-in commands -------------------------------------------------------------

    def _qmp_capabilities(self, enable: list[Literal["oob"]] | None = None) -> None:
        if enable:
            raise QmpCommandError("GenericError", f"Capability {', '.join(enable)} not available")

    def _query_commands(self) -> list[dict[str, str]]:
        names = {*BUILTIN_COMMANDS, *self._commands.names()}
        return [{"name": name} for name in sorted(names)]

    def _query_version(self) -> dict[str, object]:
        return VERSION_INFO

    def _quit(self) -> None:
        self._on_quit()


class _RawClient:
    """A blocking QMP client on a plain socket, keeping the descriptors that come with the bytes."""

    def __init__(self, sock: socket.socket, deadline: float, fds: list[int]) -> None:
        self._sock = sock
        self._deadline = deadline
        self._buffer = bytearray()
        self._fds = fds

    def message(self) -> dict[str, Any]:
        while (end := self._buffer.find(b"\n")) < 0:
            self._settimeout()
            # Not socket.recv_fds(), which ignores its flags (Python 3.11).
            data, ancillary, flags, _ = self._sock.recvmsg(
                _READ_SIZE, socket.CMSG_SPACE(_MAX_FDS * _FD_SIZE), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % _FD_SIZE])
                    self._fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise PlatformError(f"the server sent more than {_MAX_FDS} file descriptors")
            if not data:
                raise PlatformError("the server closed the connection")
            self._buffer += data
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, arguments: Mapping[str, object] | None) -> object:
        request: dict[str, object] = {"execute": command, "id": command}
        if arguments is not None:
            request["arguments"] = arguments
        self._settimeout()
        self._sock.sendall(_encode(request))
        while "event" in (reply := self.message()):
            pass
        if "error" in reply:
            raise QmpCommandError(reply["error"]["class"], reply["error"]["desc"])
        return reply["return"]

    def _settimeout(self) -> None:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        self._sock.settimeout(remaining)


def receive_fd_command(path: str | os.PathLike[str], command: str,
                       arguments: Mapping[str, object] | None = None, *,
                       timeout: float = 10.0) -> tuple[object, int]:
    """Run one command whose reply carries a file descriptor, on a connection of its own.

    Connects, negotiates, runs the command, disconnects: the client half of
    :class:`~vmmig.platforms.emu.qmp_schema.WithFds`, which qemu.qmp lacks.
    Blocking; from asyncio, run it with :func:`asyncio.to_thread`.

    :param path: the server's socket.
    :param command: a command that replies with exactly one descriptor.
    :param arguments: its arguments.
    :param timeout: seconds the whole exchange may take.
    :return: the reply's ``return`` value and the descriptor (close-on-exec),
        which the caller closes.
    :raise QmpCommandError: the command failed.
    :raise PlatformError: no server, a broken connection, a timeout, or not
        exactly one descriptor came with the reply.
    """
    received: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            client = _RawClient(sock, time.monotonic() + timeout, received)
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            client.message()  # the greeting
            client.execute("qmp_capabilities", None)
            value = client.execute(command, arguments)
    except BaseException as err:
        _close_all(received)
        if isinstance(err, OSError | ValueError):  # ValueError: the server sent no JSON
            raise PlatformError(f"QMP {command} at {path}: {err}") from err
        raise
    if len(received) != 1:
        _close_all(received)
        raise PlatformError(f"QMP {command} at {path}: the reply carried {len(received)} "
                            "file descriptors, not 1")
    return value, received[0]
