"""The emulated machine's QMP server, driven by qemu.qmp and by raw sockets.

qemu.qmp's :class:`~qemu.qmp.QMPClient` is the client vmmig uses for QEMU,
so it must work unchanged; a raw socket sends what qemu.qmp never would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import mmap
import os
import shutil
import socket
import struct
import tempfile
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient, Runstate

from vmmig import __version__
from vmmig.errors import PlatformError
from vmmig.platforms.emu import qmp_server
from vmmig.platforms.emu.qmp_server import (
    CommandTable,
    QmpCommandError,
    QmpServer,
    WithFds,
    receive_fd_command,
)


T = TypeVar("T")

#: Seconds any one test may take.
TIMEOUT = 20.0
#: A 32 KiB dirty bitmap, base64-encoded as a command would return it.
BITMAP = base64.b64encode(bytes(range(256)) * 128).decode()
PAGE = 4096


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test body in a fresh event loop, with a time limit."""

    async def bounded() -> T:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return asyncio.run(bounded())


# -- Commands of the test machine ---------------------------------------------------------


def query_status() -> dict[str, object]:
    return {"status": "running", "singlestep": False, "running": True}


async def echo(*, text: str, count: int = 1, shout: bool = False) -> dict[str, object]:
    await asyncio.sleep(0)
    return {"text": (text.upper() if shout else text) * count}


def typed(*, name: str, size: int, ratio: float, on: bool, mode: Literal["fast", "slow"],
          pages: list[int], labels: dict[str, str], extra: Any, start_gpa: int = 0,
          note: str | None = None) -> dict[str, object]:
    return {"name": name, "size": size, "ratio": ratio, "on": on, "mode": mode, "pages": pages,
            "labels": labels, "extra": extra, "start-gpa": start_gpa, "note": note}


TYPED = {"name": "vm", "size": 4, "ratio": 0.5, "on": True, "mode": "fast", "pages": [1, 2],
         "labels": {"a": "b"}, "extra": None}


def broken() -> None:
    raise RuntimeError("the vCPU thread is gone\nand this line stays in the log")


def refusing() -> None:
    raise QmpCommandError("DeviceNotFound", "Device 'vcpu9' not found")


def bitmap() -> dict[str, str]:
    return {"bitmap": BITMAP}


def unserialisable() -> object:
    return {"pages": {1, 2}}


def bad_descriptor() -> WithFds:
    return WithFds({}, (-1,))


def make_table() -> CommandTable:
    table = CommandTable()
    handlers: dict[str, Callable[..., object]] = {
        "query-status": query_status, "x-echo": echo, "x-typed": typed, "x-broken": broken,
        "x-refusing": refusing, "x-bitmap": bitmap, "x-unserialisable": unserialisable,
        "x-bad-descriptor": bad_descriptor,
    }
    for name, handler in handlers.items():
        table.add(name, handler)
    return table


class SharedMemory:
    """A machine's shared-memory segment, offered to agents as a memfd."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("vmmig-test-shm", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, PAGE)
        self.view = mmap.mmap(self.fd, PAGE)

    def command(self) -> WithFds:
        return WithFds({"size": PAGE}, (self.fd,))

    def close(self) -> None:
        self.view.close()
        if self.fd >= 0:
            os.close(self.fd)


# -- Fixtures and clients ---------------------------------------------------------------


@pytest.fixture
def path() -> Iterator[Path]:
    """A socket path short enough for AF_UNIX, whatever the test's name."""
    directory = Path(tempfile.mkdtemp(prefix="qmp-"))
    yield directory / "qmp.sock"
    shutil.rmtree(directory)


@contextlib.asynccontextmanager
async def serving(path: Path, table: CommandTable | None = None,
                  on_quit: Callable[[], None] = lambda: None) -> AsyncIterator[QmpServer]:
    server = QmpServer(table or make_table(), on_quit=on_quit)
    await server.start(path)
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def qmp_client(path: Path) -> AsyncIterator[QMPClient]:
    client = QMPClient("test")
    await client.connect(str(path))
    try:
        yield client
    finally:
        # After the server hung up, qemu.qmp reports the EOF here, as with QEMU.
        with contextlib.suppress(EOFError):
            await client.disconnect()


class RawClient:
    """A QMP client on a bare socket, for input qemu.qmp would never send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, *, negotiate: bool = True) -> AsyncIterator[RawClient]:
        client = cls(*await asyncio.open_unix_connection(path))
        try:
            client.greeting = await client.message()
            if negotiate:
                assert await client.execute({"execute": "qmp_capabilities"}) == {"return": {}}
            yield client
        finally:
            client.writer.close()
            with contextlib.suppress(ConnectionError):
                await client.writer.wait_closed()

    def send(self, request: bytes | dict[str, object]) -> None:
        self.writer.write(request if isinstance(request, bytes) else json.dumps(request).encode())

    async def message(self) -> dict[str, Any]:
        line = await self.reader.readline()
        assert line.endswith(b"\r\n"), line
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, request: bytes | dict[str, object]) -> dict[str, Any]:
        self.send(request)
        return await self.message()

    async def at_eof(self) -> bool:
        return await self.reader.read() == b""

    async def delivered(self) -> None:
        """Wait until the server has read all that was sent (``SIOCOUTQ`` drops to 0)."""
        await self.writer.drain()
        fd = self.writer.get_extra_info("socket").fileno()
        while struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, bytes(4)))[0]:
            await asyncio.sleep(0)


def error(error_class: str, desc: str, **rest: object) -> dict[str, object]:
    return {"error": {"class": error_class, "desc": desc}, **rest}


# -- Tests --------------------------------------------------------------------------------


class TestNegotiation:
    def test_qemu_qmp_connects_and_negotiates(self, path):
        """qemu.qmp accepts the greeting (version 0.0.0, package vmmig-emu) and negotiates."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as client:
                assert client.runstate is Runstate.RUNNING
                assert client.greeting is not None
                assert client.greeting._asdict() == {"QMP": {
                    "version": {"qemu": {"micro": 0, "minor": 0, "major": 0},
                                "package": f"vmmig-emu {__version__}"},
                    "capabilities": [],
                }}
                assert server.clients == 1

        run(body())

    def test_commands_before_negotiation_are_refused_as_in_qemu(self, path):
        """Before qmp_capabilities any command, known or not, is CommandNotFound."""
        expecting = "Expecting capabilities negotiation with 'qmp_capabilities'"

        async def body() -> None:
            async with serving(path), RawClient.connect(path, negotiate=False) as client:
                for name in ("query-status", "query-commands", "x-nonexistent"):
                    reply = await client.execute({"execute": name, "id": 1})
                    assert reply == error("CommandNotFound", expecting, id=1)
                assert await client.execute({"execute": "qmp_capabilities"}) == {"return": {}}
                assert (await client.execute({"execute": "query-status"}))["return"] == (
                    query_status())

        run(body())

    def test_capabilities_the_server_lacks_are_refused(self, path):
        """``oob`` is not offered and an unknown name is no capability; negotiation stays open."""

        async def body() -> None:
            async with serving(path), RawClient.connect(path, negotiate=False) as client:
                for enable, desc in [(["oob"], "Capability oob not available"),
                                     (["foo"], "Parameter 'enable[0]' does not accept value 'foo'"),
                                     ("oob", "Parameter 'enable' expects array")]:
                    reply = await client.execute({"execute": "qmp_capabilities",
                                                  "arguments": {"enable": enable}})
                    assert reply == error("GenericError", desc)
                reply = await client.execute({"execute": "qmp_capabilities",
                                              "arguments": {"enable": []}})
                assert reply == {"return": {}}

        run(body())

    def test_negotiating_twice_is_refused_as_in_qemu(self, path):
        """A second qmp_capabilities is CommandNotFound, as in QEMU."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError) as info:
                    await client.execute("qmp_capabilities")
                assert info.value.error_class == "CommandNotFound"
                assert str(info.value) == (
                    "Capabilities negotiation is already complete, command ignored"
                )

        run(body())


class TestCommands:
    def test_a_sync_handler_without_arguments(self, path):
        """A plain function's return value is the reply."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                assert await client.execute("query-status") == query_status()

        run(body())

    def test_an_async_handler_with_arguments_and_defaults(self, path):
        """A coroutine function gets its arguments by keyword, defaults for those omitted."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                assert await client.execute("x-echo", {"text": "ab"}) == {"text": "ab"}
                assert await client.execute("x-echo", {"text": "ab", "count": 2,
                                                       "shout": True}) == {"text": "ABAB"}

        run(body())

    def test_every_argument_type_arrives_checked(self, path):
        """Each QAPI type arrives as declared; a number may be written as an integer."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                reply = await client.execute("x-typed", {**TYPED, "ratio": 2, "start-gpa": 4096,
                                                         "note": "n"})
                assert reply == {**TYPED, "ratio": 2.0, "start-gpa": 4096, "note": "n"}
                assert isinstance(reply["ratio"], float)
                reply = await client.execute("x-typed", TYPED)
                assert reply == {**TYPED, "start-gpa": 0, "note": None}

        run(body())

    def test_none_is_an_empty_object(self, path):
        """A handler returning None replies ``{}``, as QEMU's commands without a result do."""
        table = CommandTable()
        table.add("stop", lambda: None)

        async def body() -> None:
            async with serving(path, table), qmp_client(path) as client:
                assert await client.execute("stop") == {}

        run(body())

    def test_query_commands_lists_the_built_ins_and_the_table(self, path):
        """query-commands answers as QEMU's does: a list of ``{"name": ...}``."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                entries = cast(list[dict[str, str]], await client.execute("query-commands"))
                names = [entry["name"] for entry in entries]
                assert names == sorted(["qmp_capabilities", "query-commands", "query-version",
                                        "quit", *make_table().names()])

        run(body())

    def test_query_version_answers_like_the_greeting(self, path):
        """query-version returns the greeting's version object."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                assert client.greeting is not None
                assert await client.execute("query-version") == client.greeting.QMP.version

        run(body())

    def test_commands_added_after_start_are_served(self, path):
        """The table is read per request: a command registered later is found."""
        table = CommandTable()

        async def body() -> None:
            async with serving(path, table), qmp_client(path) as client:
                table.add("query-status", query_status)
                assert await client.execute("query-status") == query_status()

        run(body())

    def test_the_id_is_echoed_whatever_its_type(self, path):
        """Replies, errors included, carry the request's id; without one they carry none."""

        async def body() -> None:
            async with serving(path), RawClient.connect(path) as client:
                for ident in ["a", 7, {"seq": [1, 2]}, None]:
                    reply = await client.execute({"execute": "query-status", "id": ident})
                    assert reply == {"return": query_status(), "id": ident}
                    reply = await client.execute({"execute": "x-nope", "id": ident})
                    assert reply["id"] == ident
                    reply = await client.execute({"id": ident})
                    assert reply["id"] == ident
                assert "id" not in await client.execute({"execute": "query-status"})

        run(body())

    def test_large_results_arrive_whole(self, path):
        """A 32 KiB bitmap, base64-encoded, comes back intact, many times over."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                for _ in range(50):
                    assert await client.execute("x-bitmap") == {"bitmap": BITMAP}

        run(body())

    def test_two_thousand_calls_in_a_row(self, path):
        """A qemu.qmp client runs 2,000 commands back to back (timed in the benchmark, not here)."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                for _ in range(2000):
                    await client.execute("query-status")

        run(body())

    def test_requests_need_no_newline_and_may_come_in_pieces(self, path):
        """Requests are cut where their JSON ends, however the reads divide them."""
        tricky = r'}{[\"\\'  # brackets, quote and backslash inside a string
        request = json.dumps({"execute": "x-echo", "arguments": {"text": tricky}, "id": 1})
        data = request.encode()

        async def body() -> None:
            async with serving(path), RawClient.connect(path) as client:
                # Two requests in one read, then one read a byte at a time.
                client.send(data + data)
                for _ in range(2):
                    assert await client.message() == {"return": {"text": tricky}, "id": 1}
                for byte in data:
                    client.send(bytes([byte]))
                    await client.delivered()
                assert await client.message() == {"return": {"text": tricky}, "id": 1}
                # Blank input between requests is skipped.
                assert (await client.execute(b" \r\n\t" + data + b"\r\n"))["id"] == 1

        run(body())

    def test_commands_run_one_at_a_time_across_clients(self, path):
        """Handlers never overlap, even when they wait and several clients call them."""
        table = CommandTable()
        running: list[int] = []
        overlaps: list[int] = []

        @table.command("x-exclusive")
        async def exclusive() -> None:
            running.append(1)
            overlaps.append(len(running))
            for _ in range(3):
                await asyncio.sleep(0)
            running.pop()

        async def caller() -> None:
            async with qmp_client(path) as client:
                for _ in range(20):
                    await client.execute("x-exclusive")

        async def body() -> None:
            async with serving(path, table):
                await asyncio.gather(caller(), caller(), caller())

        run(body())
        assert len(overlaps) == 60
        assert set(overlaps) == {1}


class TestRegistration:
    def test_a_name_is_registered_once(self):
        """A second handler for a name, or one for a built-in, is refused."""
        table = make_table()
        with pytest.raises(ValueError, match="QMP command query-status is defined already"):
            table.add("query-status", query_status)
        with pytest.raises(ValueError, match="QMP command quit is defined already"):
            table.add("quit", query_status)

    def test_the_decorator_registers_and_returns_the_function(self):
        """``@table.command(name)`` leaves the function as it was."""
        table = CommandTable()
        assert table.command("query-status")(query_status) is query_status
        command = table.get("query-status")
        assert command is not None
        assert command.handler is query_status
        assert table.names() == ["query-status"]

    @pytest.mark.parametrize(("source", "problem"), [
        ("def f(*, x: tuple[int, int]): pass", "parameter x: tuple[int, int] is not a QMP"),
        ("def f(*, x: set[str]): pass", "parameter x: set[str] is not a QMP argument type"),
        ("def f(*, x: int | str): pass", "parameter x: the only union allowed is 'T | None'"),
        ("def f(*, x: int | None): pass", "parameter x: the only union allowed is 'T | None'"),
        ("def f(*, x: Literal[1, 2]): pass", "parameter x: typing.Literal[1, 2] is not a QMP"),
        ("def f(*, x): pass", "parameter x needs a type annotation"),
        ("def f(*x: int): pass", "parameter x must be passable by keyword, alone"),
        ("def f(**x: int): pass", "parameter x must be passable by keyword, alone"),
        ("def f(*, x: Unknown): pass", "name 'Unknown' is not defined"),
    ])
    def test_signatures_it_cannot_check_are_refused(self, source, problem):
        """A handler is refused at registration when its arguments cannot be checked."""
        namespace: dict[str, Any] = {"Literal": Literal}
        exec(f"from __future__ import annotations\n{source}", namespace)
        with pytest.raises(TypeError, match=r"^QMP command x-f: ") as info:
            CommandTable().add("x-f", namespace["f"])
        assert problem in str(info.value)


class TestArgumentErrors:
    @pytest.mark.parametrize(("command", "arguments", "desc"), [
        ("x-echo", {}, "Parameter 'text' is missing"),
        ("x-echo", {"text": 1}, "Parameter 'text' expects string"),
        ("x-echo", {"text": None}, "Parameter 'text' expects string"),
        ("x-echo", {"text": "a", "count": "2"}, "Parameter 'count' expects integer"),
        ("x-echo", {"text": "a", "count": True}, "Parameter 'count' expects integer"),
        ("x-echo", {"text": "a", "count": 1.5}, "Parameter 'count' expects integer"),
        ("x-echo", {"text": "a", "shout": 1}, "Parameter 'shout' expects boolean"),
        ("x-echo", {"text": "a", "colour": "red"}, "Parameter 'colour' is unexpected"),
        ("query-status", {"verbose": True}, "Parameter 'verbose' is unexpected"),
        ("x-typed", {**TYPED, "ratio": "1"}, "Parameter 'ratio' expects number"),
        ("x-typed", {**TYPED, "mode": "warp"}, "Parameter 'mode' does not accept value 'warp'"),
        ("x-typed", {**TYPED, "mode": 1}, "Parameter 'mode' expects string"),
        ("x-typed", {**TYPED, "pages": 3}, "Parameter 'pages' expects array"),
        ("x-typed", {**TYPED, "pages": [1, "2"]}, "Parameter 'pages[1]' expects integer"),
        ("x-typed", {**TYPED, "labels": []}, "Parameter 'labels' expects object"),
        ("x-typed", {**TYPED, "labels": {"a": 1}}, "Parameter 'labels.a' expects string"),
        ("x-typed", {**TYPED, "note": None}, "Parameter 'note' expects string"),
        ("x-typed", {**TYPED, "start_gpa": 1}, "Parameter 'start_gpa' is unexpected"),
        ("x-typed", {"size": "x"}, "Parameter 'name' is missing"),
    ])
    def test_wrong_arguments_get_qemus_descriptions(self, path, command, arguments, desc):
        """Missing, mistyped and unexpected arguments are a GenericError worded as in QEMU."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError) as info:
                    await client.execute(command, arguments)
                assert (info.value.error_class, str(info.value)) == ("GenericError", desc)
                assert await client.execute("query-status") == query_status()

        run(body())


class TestCommandErrors:
    def test_an_unknown_command_is_command_not_found(self, path):
        """An unknown command gets QEMU's CommandNotFound error."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError) as info:
                    await client.execute("x-nope")
                assert info.value.error_class == "CommandNotFound"
                assert str(info.value) == "The command x-nope has not been found"

        run(body())

    def test_a_qmp_command_error_is_the_reply(self, path):
        """A handler's QmpCommandError becomes the error, class and description."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError) as info:
                    await client.execute("x-refusing")
                assert info.value.error_class == "DeviceNotFound"
                assert str(info.value) == "Device 'vcpu9' not found"

        run(body())

    @pytest.mark.parametrize(("command", "desc"), [
        ("x-broken", "x-broken failed: RuntimeError: the vCPU thread is gone"),
        ("x-unserialisable", "x-unserialisable failed: TypeError: Object of type set is not "
                             "JSON serializable"),
        ("x-bad-descriptor", "x-bad-descriptor failed: OSError: [Errno 9] Bad file descriptor"),
    ])
    def test_a_failing_handler_is_logged_and_the_connection_goes_on(self, path, caplog, command,
                                                                    desc):
        """Any other failure is a one-line GenericError, logged with its traceback."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError) as info:
                    await client.execute(command)
                assert (info.value.error_class, str(info.value)) == ("GenericError", desc)
                assert await client.execute("query-status") == query_status()

        with caplog.at_level(logging.ERROR, logger="vmmig.platforms.emu.qmp_server"):
            run(body())
        [record] = caplog.records
        assert record.getMessage() == f"QMP command {command} failed"
        assert record.exc_info is not None


class TestMalformedInput:
    @pytest.mark.parametrize(("data", "desc"), [
        (b'{"execute": }', "JSON parse error, expecting value at column 13"),
        (b'{"execute": "query-status",}',
         "JSON parse error, expecting property name enclosed in double quotes at column 28"),
        (b"nonsense\n", "JSON parse error, expecting value at column 1"),
        (b"}", "JSON parse error, expecting value at column 1"),
        (b'{"execute": "stop", "execute": "quit"}', "JSON parse error, duplicate key"),
        (b'{"execute": NaN}', "JSON parse error, invalid keyword 'NaN'"),
        (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8 sequence"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON parse error, too deeply nested"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'"query-status"', "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
    ])
    def test_input_that_is_no_json_object_is_answered_without_id(self, path, data, desc):
        """Bad JSON, and JSON that is no object, get QEMU's error with no id; then work goes on."""

        async def body() -> None:
            async with serving(path), RawClient.connect(path) as client:
                assert await client.execute(data) == error("GenericError", desc)
                reply = await client.execute({"execute": "query-status", "id": 2})
                assert reply == {"return": query_status(), "id": 2}

        run(body())

    @pytest.mark.parametrize(("request_", "desc"), [
        ({"arguments": {}}, "QMP input lacks member 'execute'"),
        ({"execute": 1}, "QMP input member 'execute' must be a string"),
        ({"execute": "query-status", "arguments": []},
         "QMP input member 'arguments' must be an object"),
        ({"execute": "query-status", "extra": 1}, "QMP input member 'extra' is unexpected"),
        ({"exec-oob": "query-status"},
         "QMP input member 'exec-oob' is unexpected: this server has no out-of-band execution"),
    ])
    def test_malformed_requests_get_qemus_errors(self, path, request_, desc):
        """A request object with a missing, mistyped or unknown member is refused as QEMU does."""

        async def body() -> None:
            async with serving(path), RawClient.connect(path) as client:
                reply = await client.execute({**request_, "id": "r"})
                assert reply == error("GenericError", desc, id="r")
                assert (await client.execute({"execute": "query-status"}))["return"] == (
                    query_status())

        run(body())

    def test_qemu_qmp_oob_execution_is_refused(self, path):
        """qemu.qmp's ``oob=True`` gets an error saying there is no out-of-band execution."""

        async def body() -> None:
            async with serving(path), qmp_client(path) as client:
                with pytest.raises(ExecuteError, match="no out-of-band execution"):
                    await client.execute("query-status", oob=True)

        run(body())

    def test_an_oversized_request_is_refused_and_disconnected(self, path, monkeypatch):
        """A request over the size limit gets a parse error, then the connection is closed."""
        monkeypatch.setattr(qmp_server, "MAX_REQUEST", 1024)

        async def body() -> None:
            async with serving(path) as server, RawClient.connect(path) as client:
                client.send(b'{"execute": "x-echo", "arguments": {"text": "' + b"a" * 2048)
                assert await client.message() == error(
                    "GenericError", "JSON parse error, request longer than 1024 bytes")
                assert await client.at_eof()
                async with qmp_client(path) as other:
                    assert await other.execute("query-status") == query_status()
                    assert server.clients == 1

        run(body())


class TestEvents:
    def test_events_reach_a_qemu_qmp_listener(self, path):
        """An event, with its data and a current timestamp, reaches qemu.qmp's listener."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as client:
                listener = EventListener(("MIGRATION",))
                with client.listen(listener):
                    before = time.time()
                    server.emit("MIGRATION", {"status": "active"})
                    event = await listener.get()
                after = time.time()
                assert event["event"] == "MIGRATION"
                assert event["data"] == {"status": "active"}
                stamp = cast(dict[str, int], event["timestamp"])
                assert 0 <= stamp["microseconds"] < 1_000_000
                assert before - 1e-6 <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= after

        run(body())

    def test_an_event_without_data_has_no_data_member(self, path):
        """As QEMU's STOP, an event without data has no ``data`` member at all."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as client:
                listener = EventListener(("STOP",))
                with client.listen(listener):
                    server.emit("STOP")
                    event = await listener.get()
                assert set(event.keys()) == {"event", "timestamp"}

        run(body())

    def test_events_may_be_emitted_from_other_threads(self, path):
        """A vCPU thread may emit; the event is sent from the server's loop."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as client:
                listener = EventListener(("X-VCPU-HALTED",))
                with client.listen(listener):
                    thread = threading.Thread(target=server.emit,
                                              args=("X-VCPU-HALTED", {"cpu": 1}))
                    thread.start()
                    event = await listener.get()
                    thread.join()
                assert event["data"] == {"cpu": 1}

        run(body())

    def test_every_negotiated_client_gets_events_and_others_none(self, path):
        """All negotiated clients get an event; one still negotiating gets none."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as first, \
                    qmp_client(path) as second, \
                    RawClient.connect(path, negotiate=False) as newcomer:
                one, two = EventListener(), EventListener()
                with first.listen(one), second.listen(two):
                    server.emit("RESUME")
                    assert (await one.get())["event"] == "RESUME"
                    assert (await two.get())["event"] == "RESUME"
                # An event sent to the newcomer would come before this reply.
                assert await newcomer.execute({"execute": "qmp_capabilities"}) == {"return": {}}
                server.emit("STOP")
                assert (await newcomer.message())["event"] == "STOP"

        run(body())

    def test_without_clients_or_after_close_events_are_dropped(self, path):
        """Emitting with nobody connected, or after close, is harmless."""

        async def body() -> None:
            server = QmpServer(make_table(), on_quit=lambda: None)
            server.emit("STOP")
            await server.start(path)
            server.emit("STOP")
            await server.close()
            server.emit("STOP")

        run(body())

    def test_data_that_is_no_json_is_refused_at_once(self, path):
        """``emit`` raises in its caller when the data cannot be sent."""

        async def body() -> None:
            async with serving(path) as server:
                with pytest.raises(TypeError):
                    server.emit("X-BAD", {"pages": {1}})

        run(body())


class TestQuit:
    def test_quit_calls_the_callback_replies_and_hangs_up(self, path):
        """quit calls the shutdown callback, replies ``{}`` with the id, then closes."""
        calls: list[str] = []

        async def body() -> None:
            async with serving(path, on_quit=lambda: calls.append("quit")) as server:
                async with RawClient.connect(path) as client:
                    assert await client.execute({"execute": "quit", "id": 9}) == (
                        {"return": {}, "id": 9})
                    assert await client.at_eof()
                assert calls == ["quit"]
                # Shutting down is the callback's business: the server still serves.
                async with qmp_client(path) as client:
                    assert await client.execute("query-status") == query_status()
                    assert server.clients == 1

        run(body())

    def test_qemu_qmp_gets_the_quit_reply(self, path):
        """qemu.qmp sees quit succeed, as with QEMU."""
        quitting = asyncio.Event()

        async def body() -> None:
            async with serving(path, on_quit=quitting.set), qmp_client(path) as client:
                assert await client.execute("quit") == {}
                assert quitting.is_set()

        run(body())

    def test_a_failing_callback_is_an_error_and_the_connection_stays(self, path, caplog):
        """If the callback raises, quit fails with a GenericError and nothing closes."""

        def refuse() -> None:
            raise RuntimeError("not now")

        async def body() -> None:
            async with serving(path, on_quit=refuse), qmp_client(path) as client:
                with pytest.raises(ExecuteError, match=r"^quit failed: RuntimeError: not now$"):
                    await client.execute("quit")
                assert await client.execute("query-status") == query_status()

        with caplog.at_level(logging.CRITICAL):
            run(body())


class TestConnections:
    def test_clients_may_connect_one_after_another(self, path):
        """A client may come after another has left."""

        async def body() -> None:
            async with serving(path) as server:
                for _ in range(3):
                    async with qmp_client(path) as client:
                        assert await client.execute("query-status") == query_status()
                        assert server.clients == 1

        run(body())

    def test_clients_may_be_connected_at_once(self, path):
        """Several clients are served side by side, each with its own negotiation."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as first, \
                    qmp_client(path) as second:
                assert server.clients == 2
                replies = await asyncio.gather(first.execute("x-echo", {"text": "1"}),
                                               second.execute("x-echo", {"text": "2"}))
                assert list(replies) == [{"text": "1"}, {"text": "2"}]

        run(body())

    def test_a_client_that_leaves_mid_reply_disturbs_nobody(self, path):
        """A client that sends many requests and hangs up unread leaves the others served."""

        async def body() -> None:
            async with serving(path) as server, qmp_client(path) as steady:
                async with RawClient.connect(path) as leaving:
                    for _ in range(100):
                        leaving.send({"execute": "x-bitmap"})
                    await leaving.writer.drain()
                for _ in range(100):
                    assert await steady.execute("query-status") == query_status()
                assert server.clients >= 1

        run(body())

    def test_close_disconnects_clients_and_removes_the_socket(self, path):
        """close() hangs up on every client and removes the socket file it made."""

        async def body() -> None:
            server = QmpServer(make_table(), on_quit=lambda: None)
            await server.start(path)
            async with qmp_client(path) as client, RawClient.connect(path) as raw:
                await server.close()
                assert await raw.at_eof()
                while client.runstate is Runstate.RUNNING:
                    await client.runstate_changed()
                assert not path.exists()
                assert server.clients == 0
            await server.close()

        run(body())

    def test_close_sends_a_last_event_first(self, path):
        """An event emitted just before close() still reaches the client."""

        async def body() -> None:
            server = QmpServer(make_table(), on_quit=lambda: None)
            await server.start(path)
            async with RawClient.connect(path) as client:
                server.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                await server.close()
                assert (await client.message())["event"] == "SHUTDOWN"
                assert await client.at_eof()

        run(body())

    def test_a_listening_socket_may_be_handed_over(self, path):
        """A socket bound and listening before the server starts is served, so no polling."""

        async def body() -> None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(path))
            listener.listen()
            server = QmpServer(make_table(), on_quit=lambda: None)
            await server.start(listener)
            try:
                async with qmp_client(path) as client:
                    assert await client.execute("query-status") == query_status()
            finally:
                await server.close()
            assert listener.fileno() == -1

        run(body())

    def test_an_unusable_path_is_a_platform_error(self, path):
        """A path that exists, or that no Unix socket can hold, is refused with its reason."""

        async def body() -> None:
            path.touch()
            server = QmpServer(make_table(), on_quit=lambda: None)
            with pytest.raises(PlatformError, match=r"cannot serve QMP on .*: Address already in"):
                await server.start(path)
            with pytest.raises(PlatformError, match="too long a path for a Unix socket"):
                await server.start(path.parent / ("x" * 120))
            assert path.exists()

        run(body())


class TestFdPassing:
    def test_an_agent_maps_the_memory_whose_descriptor_came_with_the_reply(self, path):
        """The fd arrives with the reply; what the agent writes through it, the machine sees."""
        shm = SharedMemory()
        table = CommandTable()
        table.add("x-shared-memory", shm.command)

        async def body() -> None:
            async with serving(path, table):
                value, fd = await asyncio.to_thread(receive_fd_command, path, "x-shared-memory")
            assert value == {"size": PAGE}
            # The machine's own descriptor may go: the agent holds a duplicate.
            os.close(shm.fd)
            shm.fd = -1
            try:
                assert not os.get_inheritable(fd)
                with mmap.mmap(fd, PAGE) as agent_view:
                    agent_view[:20] = b"written by the agent"
            finally:
                os.close(fd)
            assert shm.view[:20] == b"written by the agent"

        try:
            run(body())
        finally:
            shm.close()

    def test_qemu_qmp_gets_the_reply_and_no_descriptor_leaks(self, path):
        """qemu.qmp cannot take the fd: it gets the reply, and no descriptor stays open."""
        shm = SharedMemory()
        table = CommandTable()
        table.add("x-shared-memory", shm.command)
        table.add("query-status", query_status)

        async def body() -> None:
            async with serving(path, table), qmp_client(path) as client:
                await client.execute("query-status")
                before = len(os.listdir("/proc/self/fd"))
                for _ in range(10):
                    assert await client.execute("x-shared-memory") == {"size": PAGE}
                assert await client.execute("query-status") == query_status()
                assert len(os.listdir("/proc/self/fd")) == before

        try:
            run(body())
        finally:
            shm.close()

    def test_a_descriptor_queued_behind_unread_replies_still_arrives(self, path):
        """A reply with an fd waits behind megabytes of unread replies and keeps its fd."""
        shm = SharedMemory()
        table = CommandTable()
        table.add("x-shared-memory", shm.command)
        table.add("x-bitmap", bitmap)
        count = 60  # about 2.6 MB of bitmaps: far more than a socket buffer holds

        def client() -> tuple[list[dict[str, Any]], list[int]]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(path))
                requests: list[dict[str, object]] = [{"execute": "qmp_capabilities", "id": "caps"}]
                requests += [{"execute": "x-bitmap", "id": n} for n in range(count)]
                requests += [{"execute": "x-shared-memory", "id": "shm"}]
                sock.sendall(b"".join(json.dumps(request).encode() for request in requests))
                data, fds = bytearray(), []
                while data.count(b"\n") < len(requests) + 1:  # and the greeting
                    chunk, received, _, _ = socket.recv_fds(sock, 1 << 16, 4)
                    assert chunk
                    data += chunk
                    fds += received
                return [json.loads(line) for line in data.splitlines()], fds

        async def body() -> tuple[list[dict[str, Any]], list[int]]:
            async with serving(path, table):
                return await asyncio.to_thread(client)

        try:
            messages, fds = run(body())
            assert [message.get("id") for message in messages[1:]] == (
                ["caps", *range(count), "shm"])
            assert all(message["return"] == {"bitmap": BITMAP} for message in messages[2:-1])
            assert len(fds) == 1
            with mmap.mmap(fds[0], PAGE) as agent_view:
                agent_view[:2] = b"ok"
            os.close(fds[0])
            assert shm.view[:2] == b"ok"
        finally:
            shm.close()

    def test_a_failing_command_raises_its_error(self, path):
        """An error reply raises QmpCommandError with the server's class and description."""

        async def body() -> None:
            async with serving(path):
                with pytest.raises(QmpCommandError, match="Device 'vcpu9' not found") as info:
                    await asyncio.to_thread(receive_fd_command, path, "x-refusing")
                assert info.value.error_class == "DeviceNotFound"

        run(body())

    def test_a_reply_without_a_descriptor_is_a_platform_error(self, path):
        """A command whose reply carries no fd is an error, not a silent success."""

        async def body() -> None:
            async with serving(path):
                with pytest.raises(PlatformError,
                                   match="the reply carried 0 file descriptors, not 1"):
                    await asyncio.to_thread(receive_fd_command, path, "query-status")

        run(body())

    def test_no_server_is_a_platform_error(self, path):
        """Without a server at the path the helper fails with a PlatformError."""
        with pytest.raises(PlatformError, match=r"QMP x-shared-memory at .*No such file"):
            receive_fd_command(path, "x-shared-memory", timeout=1)
