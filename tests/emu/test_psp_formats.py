"""Byte formats and constructions of the emulated PSP, pinned by test vectors.

Two kinds of vectors: those published by virtee/sev's own tests (so our
KDF, session wrapping and measurement interoperate with real PSPs), and our
own, computed once and committed, so that a refactor changing any format is
caught.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from psp_support import amd_root

from vmmig.platforms.emu.psp import FirmwareVersion, Measurement, Policy, build_secret_packet
from vmmig.platforms.emu.psp.amd_cert import AmdCert
from vmmig.platforms.emu.psp.packets import (
    PacketHeader,
    TransportKind,
    measurement_mac,
    secret_mac,
    transport_mac,
)
from vmmig.platforms.emu.psp.primitives import aes128_ctr, kdf
from vmmig.platforms.emu.psp.session import SessionBlob, TransportKeys, wrap_session
from vmmig.platforms.emu.psp.sev_cert import (
    SEV_CERT_SIZE,
    SevCert,
    Usage,
    make_sev_cert,
    sign_sev_cert,
    verify_sev_signature,
)


KEYS = TransportKeys(tek=bytes(range(16, 32)), tik=bytes(range(32, 48)))
POLICY = Policy(nodbg=True, noks=True, es=True, api_major=1, api_minor=55)
FIXED_KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP384R1())


class TestPublishedVectors:
    """virtee/sev src/session/key.rs and src/session/mod.rs unit tests."""

    def test_kdf_master_secret(self):
        """KDF(zero key, "sev-master-secret", zero nonce) matches virtee's vector."""
        master = kdf(bytes(16), "sev-master-secret", bytes(16))
        assert master.hex() == "ab4d269fcc62bedb4511d56c386ce706"

    def test_session_wrapping(self):
        """All-zero Z, nonce, IV, TEK, TIK and policy give virtee's session fields."""
        blob = wrap_session(
            bytes(16),
            nonce=bytes(16),
            wrap_iv=bytes(16),
            keys=TransportKeys(bytes(16), bytes(16)),
            policy=Policy(),
        )
        assert blob.wrap_tk.hex() == (
            "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
        )
        assert blob.wrap_mac.hex() == (
            "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
        )
        assert blob.policy_mac.hex() == (
            "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
        )

    def test_launch_measurement(self):
        """virtee's measurement of an empty image under firmware 0.18 build 15 verifies."""
        measure = measurement_mac(
            bytes.fromhex("66320db73158a35a255d051758e95ed4"),
            FirmwareVersion(0x00, 0x12, 0x0F),
            Policy(),
            hashlib.sha256(b"").digest(),
            bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"),
        )
        assert measure.hex() == "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"


class TestOwnVectors:
    """Computed once with this implementation; a change here is a format change."""

    def test_kdf_over_two_blocks(self):
        """A 40-byte output exercises the counter past the first HMAC block."""
        out = kdf(bytes(range(48)), "sev-master-secret", bytes(range(16)), 40)
        assert out.hex() == (
            "4052f08fce443ce0bd049784b485d72e6f985964cf9c2d175673b738f60f4ef342f3c3876c09ca83"
        )

    def test_session_blob(self):
        """A session blob from fixed Z, nonce, IV, keys and policy 0x37010007."""
        assert POLICY.value == 0x37010007
        blob = wrap_session(
            bytes(range(48)),
            nonce=bytes(range(48, 64)),
            wrap_iv=bytes(range(64, 80)),
            keys=KEYS,
            policy=POLICY,
        )
        assert blob.to_bytes().hex() == (
            "303132333435363738393a3b3c3d3e3f17a5dfa396e8d480e4e36f95c7ff0906"
            "42ae2bad390138fa2d8f66a22fa7e6a6404142434445464748494a4b4c4d4e4f"
            "f1aa022c9538e0995729734f65233cdd05ffcd679fec87f2b2f29aeaadb1f57f"
            "2783de5ba5a3854c54d1d2b7ecd21eda329665e1a42c3080c722495ffe9b8c36"
        )
        assert SessionBlob.from_bytes(blob.to_bytes()) == blob

    def test_measurement(self):
        """MEASURE under emulated firmware 1.55 build 21."""
        measure = measurement_mac(
            KEYS.tik,
            FirmwareVersion(1, 55, 21),
            POLICY,
            hashlib.sha256(b"vmmig").digest(),
            bytes(range(80, 96)),
        )
        assert measure.hex() == "18a78fcfb7f55377bc369a8b6f34f1146cb4a5e2a18aef67550c790c2214fc8e"

    def test_secret_mac(self):
        """The LAUNCH_SECRET header MAC."""
        mac = secret_mac(
            KEYS.tik,
            0,
            bytes(range(96, 112)),
            b"ciphertext".ljust(32, b"."),
            bytes(range(112, 144)),
        )
        assert mac.hex() == "d97a807e6241d07ca2c8a8d78f803f3e128862a82e4b11e17c95286325eb6ded"

    @pytest.mark.parametrize(
        ("kind", "expected"),
        [
            (
                TransportKind.DATA,
                "0d40b296a1f502badf0d751fb6a42f0268338d5fac2cb786082c5c4ae755a5ee",
            ),
            (
                TransportKind.VMSA,
                "5cd274986f5224ca538f6533edda246a8c5afa8a0181ab19044f9b450bd59c48",
            ),
        ],
    )
    def test_transport_mac(self, kind, expected):
        """The SEND/RECEIVE packet MAC, domain-separated by packet kind."""
        assert transport_mac(KEYS.tik, kind, 0, bytes(range(96, 112)), bytes(64)).hex() == expected

    def test_dh_certificate(self):
        """The unsigned SEV certificate of a fixed P-384 key."""
        cert = make_sev_cert(Usage.PDH, FIXED_KEY.public_key()).to_bytes()
        assert hashlib.sha256(cert).hexdigest() == (
            "00dbfe22cace6e7db0e062c5903576797746e2577a68eb1603fd3d23300bc24b"
        )


class TestSevCertificate:
    def test_layout_offsets(self):
        """Version, usage, algorithm, curve, LE coordinates and empty slots: spec offsets."""
        cert = make_sev_cert(Usage.PEK, FIXED_KEY.public_key(), api_major=1, api_minor=55)
        data = cert.to_bytes()
        numbers = FIXED_KEY.public_key().public_numbers()
        assert len(data) == SEV_CERT_SIZE == 0x824
        assert struct.unpack_from("<IBBHIII", data) == (1, 1, 55, 0, 0x1002, 0x002, 2)
        assert data[0x014:0x044] == numbers.x.to_bytes(48, "little")
        assert data[0x05C:0x08C] == numbers.y.to_bytes(48, "little")
        assert not any(data[0x044:0x05C] + data[0x08C:0x414])
        assert struct.unpack_from("<II", data, 0x414) == (0x1000, 0)
        assert struct.unpack_from("<II", data, 0x61C) == (0x1000, 0)

    def test_signatures_fill_slots_in_order_and_verify(self):
        """Two signers fill slot 1 then slot 2; each verifies with its key and usage only."""
        oca, cek = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
        cert = make_sev_cert(Usage.PEK, FIXED_KEY.public_key())
        cert = sign_sev_cert(sign_sev_cert(cert, Usage.OCA, oca), Usage.CEK, cek)
        parsed = SevCert.from_bytes(cert.to_bytes())
        assert [slot.usage for slot in parsed.sigs] == [Usage.OCA, Usage.CEK]
        assert verify_sev_signature(parsed, Usage.OCA, oca.public_key())
        assert verify_sev_signature(parsed, Usage.CEK, cek.public_key())
        assert not verify_sev_signature(parsed, Usage.OCA, cek.public_key())
        assert not verify_sev_signature(parsed, Usage.CEK, oca.public_key())
        with pytest.raises(ValueError, match="no free signature slot"):
            sign_sev_cert(parsed, Usage.OCA, oca)

    @pytest.mark.parametrize(
        ("offset", "value", "message"),
        [
            (0x000, 2, "version"),
            (0x006, 1, "reserved"),
            (0x010, 1, "curve"),
            (0x100, 1, "reserved"),
            (0x014, 0x01, "point"),
        ],
    )
    def test_malformed_certificates_are_rejected(self, offset, value, message):
        """A bad version, nonzero reserved byte, other curve or off-curve point is a ValueError."""
        data = bytearray(make_sev_cert(Usage.PDH, FIXED_KEY.public_key()).to_bytes())
        data[offset] ^= value
        with pytest.raises(ValueError, match=message):
            SevCert.from_bytes(bytes(data))

    def test_wrong_size_is_rejected(self):
        """A certificate must be exactly 0x824 bytes."""
        with pytest.raises(ValueError, match="0x824"):
            SevCert.from_bytes(bytes(0x823))


class TestAmdCertificate:
    def test_ark_layout(self):
        """The ARK: self-certified, usage 0, 4096-bit sizes, LE exponent and modulus, 1600 bytes."""
        root = amd_root()
        data = root.ark_cert
        version, key_id, certifying_id, usage = struct.unpack_from("<I16s16sI", data)
        numbers = root.ark_public_key.public_numbers()
        assert (version, usage) == (1, 0x00)
        assert key_id == certifying_id
        assert struct.unpack_from("<II", data, 0x38) == (4096, 4096)
        assert data[0x40:0x240] == numbers.e.to_bytes(512, "little")
        assert data[0x240:0x440] == numbers.n.to_bytes(512, "little")
        assert len(data) == 0x40 + 3 * 512

    def test_ask_is_certified_by_the_ark(self):
        """The ASK has usage 0x13 and names the ARK's key id as its certifier."""
        root = amd_root()
        ark, _ = AmdCert.parse_prefix(root.ark_cert)
        ask, size = AmdCert.parse_prefix(root.ask_cert)
        assert ask.usage is Usage.ASK
        assert ask.certifying_id == ark.key_id
        assert size == len(root.ask_cert)

    def test_unsupported_key_sizes_are_rejected(self):
        """MODULUS_SIZE other than 2048 or 4096 bits is a ValueError."""
        data = bytearray(amd_root().ark_cert)
        struct.pack_into("<II", data, 0x38, 3072, 3072)
        with pytest.raises(ValueError, match="3072"):
            AmdCert.parse_prefix(bytes(data))


class TestPacketsAndPolicy:
    def test_header_layout(self):
        """FLAGS (LE32) || IV || MAC, 0x34 bytes."""
        header = PacketHeader(1, bytes(range(16)), bytes(range(32, 64)))
        data = header.to_bytes()
        assert data == b"\x01\0\0\0" + bytes(range(16)) + bytes(range(32, 64))
        assert PacketHeader.from_bytes(data) == header
        with pytest.raises(ValueError, match="0x34"):
            PacketHeader.from_bytes(data[:-1])

    def test_measurement_blob_rejects_other_sizes(self):
        """A measurement blob is exactly 0x30 bytes."""
        with pytest.raises(ValueError, match="0x30"):
            Measurement.from_bytes(bytes(0x2F))

    def test_secret_packet_decrypts_with_the_tek(self):
        """The owner's packet is AES-128-CTR under the TEK with the header's IV."""
        header, ciphertext = build_secret_packet(KEYS.tek, KEYS.tik, bytes(32), b"s" * 32)
        iv = PacketHeader.from_bytes(header).iv
        assert aes128_ctr(KEYS.tek, iv, ciphertext) == b"s" * 32

    @pytest.mark.parametrize(
        ("policy", "word"),
        [
            (Policy(nodbg=True), 0x01),
            (Policy(noks=True), 0x02),
            (Policy(es=True), 0x04),
            (Policy(nosend=True), 0x08),
            (Policy(domain=True), 0x10),
            (Policy(sev=True), 0x20),
            (Policy(api_major=1), 0x0001_0000),
            (Policy(api_minor=55), 0x3700_0000),
        ],
    )
    def test_policy_bits(self, policy, word):
        """Each policy field has the spec's bit position, and decodes back."""
        assert policy.value == word
        assert Policy.from_value(word) == policy

    def test_reserved_policy_bits_are_rejected(self):
        """Bits 6-15 are reserved."""
        with pytest.raises(ValueError, match="reserved"):
            Policy.from_value(1 << 6)
