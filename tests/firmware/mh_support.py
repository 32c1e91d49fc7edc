"""Test helpers: the (untrusted) host's side of two Migration Handlers' mailboxes."""

from __future__ import annotations

import itertools

import numpy as np

from vmmig.firmware.abi import (
    PAGE_SIZE,
    Command,
    OpenSessionReply,
    OpenSessionRequest,
    Request,
    Response,
    Role,
    Status,
    pack_export_request,
    pack_request,
    unpack_response,
)
from vmmig.firmware.handler import MigrationHandler


SECRET = bytes(range(32))


def guest_memory(pages: int, seed: int = 0, zero_fraction: float = 0.25) -> np.ndarray:
    """Random RAM with about ``zero_fraction`` of its pages all zero."""
    rng = np.random.default_rng(seed)
    memory = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
    memory[rng.random(pages) < zero_fraction] = 0
    return memory


class Host:
    """Posts requests to one MH as the hypervisor would, numbering them."""

    def __init__(self, mh: MigrationHandler) -> None:
        self.mh = mh
        self._seq = itertools.count(1)

    def call(self, command: Command, payload: bytes = b"") -> Response:
        seq = next(self._seq)
        response = unpack_response(self.mh.handle(pack_request(Request(command, seq, payload))))
        assert response.mailbox_seq == seq
        assert response.command == command
        return response

    def ok(self, command: Command, payload: bytes = b"") -> bytes:
        response = self.call(command, payload)
        assert response.status is Status.OK, response
        return response.payload

    def export(self, gpas) -> bytes:
        return self.ok(Command.EXPORT_PAGES, pack_export_request(gpas))

    def import_status(self, record: bytes) -> Status:
        return self.call(Command.IMPORT_PAGES, record).status


def open_session(source: Host, target: Host) -> bytes:
    """Nonce exchange, source first; returns the session id (checked equal on both)."""
    first = OpenSessionReply.unpack(
        source.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE).pack())
    )
    on_target = OpenSessionReply.unpack(
        target.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.TARGET, first.own_nonce).pack())
    )
    on_source = OpenSessionReply.unpack(
        source.ok(Command.OPEN_SESSION, OpenSessionRequest(Role.SOURCE, on_target.own_nonce).pack())
    )
    assert on_source.own_nonce == first.own_nonce
    assert on_source.session_id == on_target.session_id != bytes(32)
    return on_source.session_id


def pair(memory: np.ndarray, **kwargs) -> tuple[Host, Host]:
    """A source MH over ``memory`` and a target MH over zeroed RAM, session open."""
    source = Host(MigrationHandler(memory, SECRET, **kwargs))
    target = Host(MigrationHandler(np.zeros_like(memory), SECRET, **kwargs))
    open_session(source, target)
    return source, target


def batches(pages: int, size: int) -> list[np.ndarray]:
    """All GPAs of ``pages`` pages in batches of ``size``."""
    gpas = np.arange(pages, dtype=np.uint64) * PAGE_SIZE
    return [gpas[i : i + size] for i in range(0, pages, size)]
