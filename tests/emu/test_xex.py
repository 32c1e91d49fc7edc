"""The private-memory encryption: ciphertext is bound to its address and its VM's key."""

from __future__ import annotations

import os

import pytest

from vmmig.platforms.emu.xex import PAGE, Xex


@pytest.fixture
def xex():
    return Xex(os.urandom(32))


def pages(n: int) -> bytes:
    return b"".join(bytes([i + 1]) * PAGE for i in range(n))


class TestXex:
    def test_round_trip_at_the_same_addresses(self, xex):
        """Pages decrypt to their plaintext at the addresses they were encrypted at."""
        plain, gpas = pages(3), [0x1000, 0x5000, 0x200000]
        assert xex.decrypt_pages(xex.encrypt_pages(plain, gpas), gpas) == plain

    def test_ciphertext_is_not_the_plaintext(self, xex):
        """No 16-byte block of plaintext survives in the ciphertext of a repetitive page."""
        plain = b"CANARY-0123456789abcdef" * 178 + b"CANARY-0123456789abcdef"[: PAGE % 23]
        cipher = xex.encrypt_pages(plain, [0x3000])
        assert b"CANARY" not in cipher
        blocks = {cipher[i:i + 16] for i in range(0, PAGE, 16)}
        assert len(blocks) == PAGE // 16, "equal plaintext blocks must not give equal ciphertext"

    def test_ciphertext_moved_to_another_address_decrypts_to_garbage(self, xex):
        """Ciphertext copied from one GPA to another does not decrypt to the original."""
        plain = pages(1)
        cipher = xex.encrypt_pages(plain, [0x7000])
        moved = xex.decrypt_pages(cipher, [0x8000])
        assert moved != plain
        assert sum(a == b for a, b in zip(moved, plain, strict=True)) < PAGE // 64

    def test_ciphertext_moved_to_another_vm_decrypts_to_garbage(self, xex):
        """Another VM's key (another VEK) cannot decrypt the page, even at the same GPA."""
        plain = pages(1)
        cipher = xex.encrypt_pages(plain, [0x7000])
        assert Xex(os.urandom(32)).decrypt_pages(cipher, [0x7000]) != plain

    def test_batch_equals_page_by_page(self, xex):
        """Encrypting a batch gives the same bytes as encrypting its pages one at a time."""
        plain, gpas = pages(4), [0x0, 0x1000, 0x9000, 0x3000]
        one_by_one = b"".join(xex.encrypt_pages(plain[i * PAGE:(i + 1) * PAGE], [gpa])
                              for i, gpa in enumerate(gpas))
        assert xex.encrypt_pages(plain, gpas) == one_by_one

    def test_partial_pages_are_refused(self, xex):
        """Only whole pages are encrypted."""
        with pytest.raises(ValueError, match="whole pages"):
            xex.encrypt_pages(b"x" * 100, [0])

    def test_key_length_is_checked(self):
        """A VEK must be 32 bytes."""
        with pytest.raises(ValueError, match="32 bytes"):
            Xex(b"short")
