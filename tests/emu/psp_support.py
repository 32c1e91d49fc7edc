"""Helpers shared by the PSP tests; this module holds no tests.

The PSP tests import these helpers by module name (tests/emu is on the
test path; fixtures shared by every emu suite are in its conftest).  The AMD root is generated once
per test session (RSA-4096 key generation takes about a second).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from vmmig.platforms.emu.psp import (
    EmulatedAmdRoot,
    LaunchSession,
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    LaunchUpdateVmsaRequest,
    Measurement,
    Policy,
    Psp,
    build_launch_session,
    verify_chain,
)


MEMORY_SIZE = 64 * 1024


@functools.cache
def amd_root() -> EmulatedAmdRoot:
    """The emulated AMD root every test host shares (4096-bit, as AMD's)."""
    return EmulatedAmdRoot.generate()


def make_psp(tmp_path: Path, host: str = "host-a", **kwargs: object) -> Psp:
    """The PSP of ``host``, its identity under ``tmp_path/host``."""
    return Psp.load_or_create(tmp_path / host, host_name=host, root=amd_root(), **kwargs)


class FakeGuestMemory:
    """A machine's guest memory as the PSP sees it: private bytes, VMSAs, a key slot."""

    def __init__(self, size: int = MEMORY_SIZE) -> None:
        self.private = bytearray(size)
        self.vmsas: dict[int, bytes] = {}
        self.vek: bytes | None = None
        self.writes = 0

    def write_private(self, gpa: int, plaintext: bytes) -> None:
        self.private[gpa : gpa + len(plaintext)] = plaintext
        self.writes += 1

    def read_private(self, gpa: int, n: int) -> bytes:
        return bytes(self.private[gpa : gpa + n])

    def write_vmsa(self, vcpu_index: int, plaintext: bytes) -> None:
        self.vmsas[vcpu_index] = plaintext
        self.writes += 1

    def read_vmsa(self, vcpu_index: int) -> bytes:
        return self.vmsas[vcpu_index]

    def load_key(self, vek: bytes) -> None:
        self.vek = vek


class Launched(NamedTuple):
    handle: int
    owner: LaunchSession
    measurement: Measurement


def owner_session(psp: Psp, policy: Policy) -> LaunchSession:
    """What the guest owner builds after verifying ``psp``'s chain."""
    return build_launch_session(verify_chain(psp.chain, amd_root().ark_public_key), policy)


def start(psp: Psp, policy: Policy) -> tuple[int, LaunchSession]:
    """LAUNCH_START with a genuine owner session."""
    owner = owner_session(psp, policy)
    return psp.launch_start(LaunchStartRequest(policy, owner.dh_cert, owner.session)), owner


def launch(
    psp: Psp,
    memory: FakeGuestMemory,
    policy: Policy,
    image: Sequence[tuple[int, bytes]],
    vmsas: Sequence[bytes] = (),
) -> Launched:
    """Start, load ``image`` (gpa, data) and ``vmsas``, and measure: the guest is in LSECRET."""
    handle, owner = start(psp, policy)
    for gpa, data in image:
        psp.launch_update_data(LaunchUpdateDataRequest(handle, gpa, data), memory)
    for index, vmsa in enumerate(vmsas):
        psp.launch_update_vmsa(LaunchUpdateVmsaRequest(handle, index, vmsa), memory)
    return Launched(handle, owner, psp.launch_measure(handle))


def page(seed: int) -> bytes:
    """A recognisable 4 KiB page."""
    return bytes((seed * 7 + i) % 251 for i in range(4096))
