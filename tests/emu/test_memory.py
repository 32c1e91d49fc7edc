"""The hardware rules on guest memory: the host sees and writes only ciphertext of private pages."""

from __future__ import annotations

import os

import numpy as np
import pytest

from vmmig.errors import PlatformError
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.xex import PAGE, Xex


CANARY = b"vmmig-canary-7f3a9c"


@pytest.fixture
def sev_memory():
    memory = GuestMemory(64 * PAGE, encryption=Xex(os.urandom(32)))
    yield memory
    memory.close()


def guest_writes(memory: GuestMemory, page: int, data: bytes) -> None:
    """What a vCPU does: write plaintext straight into RAM."""
    memory.ram[page * PAGE:page * PAGE + len(data)] = data


def pages(*numbers: int) -> np.ndarray:
    return np.array(numbers, dtype=np.uint64)


class TestPlain:
    def test_host_sees_and_writes_plaintext(self, tmp_path):
        """A plain VM's RAM is a file the host can map; host reads are plaintext."""
        memory = GuestMemory(8 * PAGE, path=tmp_path / "vm.ram")
        guest_writes(memory, 3, CANARY)
        assert memory.path is not None
        assert CANARY in memory.path.read_bytes()
        assert memory.host_read_pages(pages(3)).startswith(CANARY)
        memory.close()
        assert not (tmp_path / "vm.ram").exists()


class TestSevRules:
    def test_private_ram_has_no_path(self, sev_memory):
        """An SEV VM's RAM lives in no file the host could map."""
        assert sev_memory.path is None
        assert sev_memory.encrypted

    def test_host_reads_are_never_plaintext(self, sev_memory):
        """Whatever the guest wrote, a host read of the page shows no trace of it."""
        guest_writes(sev_memory, 5, CANARY * 200)
        seen = sev_memory.host_read_pages(pages(5))
        assert CANARY not in seen
        assert CANARY[:8] not in seen

    def test_host_write_of_plaintext_is_garbage_to_the_guest(self, sev_memory):
        """A hypervisor writing plaintext into a private page corrupts it for the guest."""
        sev_memory.host_write_pages(pages(7), CANARY.ljust(PAGE, b"\0"))
        assert not sev_memory.ram[7 * PAGE:8 * PAGE].startswith(CANARY)

    def test_ciphertext_moved_to_another_address_is_garbage(self, sev_memory):
        """Ciphertext read at one GPA and written at another does not decrypt to the original."""
        guest_writes(sev_memory, 2, CANARY * 200)
        sev_memory.host_write_pages(pages(9), sev_memory.host_read_pages(pages(2)))
        assert CANARY not in sev_memory.ram[9 * PAGE:10 * PAGE]

    def test_ciphertext_moved_to_another_vm_is_garbage(self, sev_memory):
        """Ciphertext copied into another VM (another VEK), same GPA, is garbage there."""
        other = GuestMemory(64 * PAGE, encryption=Xex(os.urandom(32)))
        guest_writes(sev_memory, 4, CANARY * 200)
        other.host_write_pages(pages(4), sev_memory.host_read_pages(pages(4)))
        assert CANARY not in other.ram[4 * PAGE:5 * PAGE]
        other.close()

    def test_ciphertext_written_back_in_place_restores_the_page(self, sev_memory):
        """Same VM, same GPA: the ciphertext decrypts again (SEV's known replay gap)."""
        guest_writes(sev_memory, 6, CANARY * 200)
        snapshot = sev_memory.host_read_pages(pages(6))
        guest_writes(sev_memory, 6, b"\0" * PAGE)
        sev_memory.host_write_pages(pages(6), snapshot)
        assert sev_memory.ram[6 * PAGE:6 * PAGE + len(CANARY)] == CANARY


class TestKeySlot:
    def test_private_ram_has_no_host_view_before_activate(self):
        """Private RAM takes its key from the PSP's ACTIVATE: no host access before, then
        ciphertext at any byte alignment."""
        memory = GuestMemory(8 * PAGE, private=True)
        guest_writes(memory, 1, CANARY)
        assert memory.encrypted
        with pytest.raises(PlatformError, match="no key"):
            memory.host_read(PAGE, len(CANARY))
        memory.load_key(os.urandom(32))
        seen = memory.host_read(PAGE + 3, len(CANARY))
        assert len(seen) == len(CANARY)
        assert seen != CANARY[3:] + b"\0" * 3
        assert memory.host_read(PAGE, 2 * PAGE)[3:3 + len(CANARY)] == seen
        memory.close()


def test_size_must_be_whole_pages():
    """RAM sizes are whole pages."""
    with pytest.raises(ValueError, match="whole number of pages"):
        GuestMemory(PAGE + 1, encryption=Xex(os.urandom(32)))
