"""The platform certificate chain, the owner's verifier, and persisted host identities."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
import textwrap

import attrs
import pytest
from psp_support import amd_root, make_psp

from vmmig.errors import PlatformError
from vmmig.platforms.emu.psp import (
    ChainError,
    EmulatedAmdRoot,
    FirmwareVersion,
    PlatformChain,
    Psp,
    verify_chain,
)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.fixture(scope="module")
def other_root():
    """A second AMD root; 2048-bit (AMD's Naples size, same format) only to save time."""
    return EmulatedAmdRoot.generate(key_bits=2048)


class TestChainVerification:
    def test_a_genuine_chain_yields_its_pdh(self, tmp_path):
        """Verification returns the PDH certificate and the API version its PEK states."""
        psp = make_psp(tmp_path)
        pdh = verify_chain(psp.chain, amd_root().ark_public_key)
        assert pdh.cert == psp.chain.pdh
        assert (pdh.api_major, pdh.api_minor) == (1, 55)

    @pytest.mark.parametrize(
        ("cert", "offset", "link"),
        [
            ("ark", 0x04, "ARK -> ARK"),  # KEY_ID: no longer its own certifier
            ("ask", 0x04, "ARK -> ASK"),  # KEY_ID, covered by the ARK's signature
            ("cek", 0x05, "ASK -> CEK"),  # API_MINOR, covered by the ASK's signature
            ("oca", 0x05, "OCA -> OCA"),
            ("pek", 0x05, "OCA -> PEK"),  # the OCA's signature is checked first
            ("pek", 0x624 + 3, "CEK -> PEK"),  # a byte of the second slot: the CEK's R
            ("pdh", 0x05, "PEK -> PDH"),
            ("pdh", 0x14, "PDH"),  # QX's low bit: no longer a point on P-384
        ],
    )
    def test_a_tampered_certificate_names_the_failing_link(self, tmp_path, cert, offset, link):
        """Flipping one bit anywhere in the chain fails verification at that link."""
        chain = make_psp(tmp_path).chain
        tampered = attrs.evolve(chain, **{cert: _flip(getattr(chain, cert), offset)})
        with pytest.raises(ChainError) as info:
            verify_chain(tampered, amd_root().ark_public_key)
        assert info.value.link == link
        assert info.value.link in str(info.value)

    def test_an_untrusted_ark_is_refused(self, tmp_path, other_root):
        """A chain that verifies under its own root fails against the owner's pinned ARK."""
        with pytest.raises(ChainError) as info:
            verify_chain(make_psp(tmp_path).chain, other_root.ark_public_key)
        assert info.value.link == "ARK"
        assert "trusted" in info.value.problem

    def test_another_hosts_pdh_is_refused(self, tmp_path):
        """Host B's PDH presented with host A's PEK fails at PEK -> PDH."""
        chain_a, chain_b = make_psp(tmp_path, "host-a").chain, make_psp(tmp_path, "host-b").chain
        with pytest.raises(ChainError) as info:
            verify_chain(attrs.evolve(chain_a, pdh=chain_b.pdh), amd_root().ark_public_key)
        assert info.value.link == "PEK -> PDH"
        assert info.value.bad_signature

    def test_a_certificate_in_the_wrong_role_is_refused(self, tmp_path):
        """The PEK certificate presented as the PDH is refused for its usage."""
        chain = make_psp(tmp_path).chain
        with pytest.raises(ChainError) as info:
            verify_chain(attrs.evolve(chain, pdh=chain.pek), amd_root().ark_public_key)
        assert info.value.link == "PDH"
        assert "PEK" in info.value.problem
        assert not info.value.bad_signature

    def test_a_truncated_certificate_is_refused(self, tmp_path):
        """A short CEK is a format error naming the CEK."""
        chain = make_psp(tmp_path).chain
        with pytest.raises(ChainError) as info:
            verify_chain(attrs.evolve(chain, cek=chain.cek[:-1]), amd_root().ark_public_key)
        assert info.value.link == "CEK"

    def test_send_start_buffers_split_back_into_the_chain(self, tmp_path):
        """PLAT_CERT (PEK||OCA||CEK) and AMD_CERT (ASK||ARK) rebuild the same chain."""
        chain = make_psp(tmp_path).chain
        assert PlatformChain.from_buffers(chain.pdh, chain.plat_certs, chain.amd_certs) == chain
        with pytest.raises(ChainError):
            PlatformChain.from_buffers(chain.pdh, chain.plat_certs, chain.amd_certs + b"\0")


class TestPersistedIdentity:
    def test_loading_the_same_directory_gives_the_same_identity(self, tmp_path):
        """Two loads of one host directory present the same PDH and chain, without the root."""
        first = make_psp(tmp_path)
        second = Psp.load_or_create(tmp_path / "host-a", host_name="host-a")
        assert second.chain == first.chain

    def test_hosts_have_distinct_identities(self, tmp_path):
        """Two host directories under one AMD root have different PDHs and CEKs."""
        chain_a, chain_b = make_psp(tmp_path, "host-a").chain, make_psp(tmp_path, "host-b").chain
        assert chain_a.pdh != chain_b.pdh
        assert chain_a.cek != chain_b.cek
        assert chain_a.ark == chain_b.ark

    def test_concurrent_processes_agree_on_one_identity(self, tmp_path):
        """Two machine processes starting at once on an empty host directory share one PDH."""
        root_dir = tmp_path / "amd"
        EmulatedAmdRoot.load_or_create(root_dir, key_bits=2048)  # 2048: speed only
        script = textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from vmmig.platforms.emu.psp import EmulatedAmdRoot, Psp
            root = EmulatedAmdRoot.load_or_create(Path({str(root_dir)!r}), key_bits=2048)
            psp = Psp.load_or_create(Path({str(tmp_path / "host")!r}), host_name="h", root=root)
            sys.stdout.write(psp.chain.pdh.hex())
        """)
        procs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
            for _ in range(2)
        ]
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
        assert all(proc.returncode == 0 for proc in procs)
        assert outputs[0] == outputs[1]
        assert len(outputs[0]) == 2 * 0x824

    def test_the_state_file_is_private(self, tmp_path):
        """The identity file holds the PDH private key, so only its owner may read it."""
        make_psp(tmp_path)
        mode = (tmp_path / "host-a" / "psp-identity.json").stat().st_mode
        assert stat.S_IMODE(mode) == 0o600

    def test_an_empty_directory_needs_a_root(self, tmp_path):
        """Creating an identity without an AMD root to endorse the CEK is refused."""
        with pytest.raises(PlatformError, match="no AMD root"):
            Psp.load_or_create(tmp_path / "new", host_name="new")

    def test_another_host_name_is_refused(self, tmp_path):
        """A host directory is bound to its host name."""
        make_psp(tmp_path)
        with pytest.raises(PlatformError, match="belongs to host"):
            Psp.load_or_create(tmp_path / "host-a", host_name="host-b")

    def test_another_root_is_refused(self, tmp_path, other_root):
        """Loading with a different AMD root than the one that endorsed the CEK is refused."""
        make_psp(tmp_path)
        with pytest.raises(PlatformError, match="another AMD root"):
            Psp.load_or_create(tmp_path / "host-a", host_name="host-a", root=other_root)

    def test_another_firmware_version_is_refused(self, tmp_path):
        """The firmware version is part of the identity (the PEK records it)."""
        make_psp(tmp_path, firmware=FirmwareVersion(1, 51, 3))
        assert Psp.load_or_create(
            tmp_path / "host-a", host_name="host-a"
        ).firmware == FirmwareVersion(1, 51, 3)
        with pytest.raises(PlatformError, match="firmware"):
            make_psp(tmp_path, firmware=FirmwareVersion(1, 55, 21))

    def test_a_corrupted_chain_is_detected_on_load(self, tmp_path):
        """A state file whose certificates no longer verify is refused."""
        make_psp(tmp_path)
        other_pdh = make_psp(tmp_path, "host-b").chain.pdh
        path = tmp_path / "host-a" / "psp-identity.json"
        state = json.loads(path.read_text())
        state["pdh"] = base64.b64encode(other_pdh).decode()
        path.write_text(json.dumps(state))
        with pytest.raises(PlatformError, match="broken"):
            Psp.load_or_create(tmp_path / "host-a", host_name="host-a")


class TestAmdRootPersistence:
    def test_the_root_loads_back_the_same(self, tmp_path):
        """A root directory gives the same ARK and ASK on every load (2048-bit: speed only)."""
        first = EmulatedAmdRoot.load_or_create(tmp_path, key_bits=2048)
        second = EmulatedAmdRoot.load_or_create(tmp_path, key_bits=2048)
        assert (second.ark_cert, second.ask_cert) == (first.ark_cert, first.ask_cert)
        with pytest.raises(PlatformError, match="2048-bit"):
            EmulatedAmdRoot.load_or_create(tmp_path, key_bits=4096)
