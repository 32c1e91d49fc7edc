"""Session keys: pinned vectors, and fresh nonces giving unrelated keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmmig.firmware.keys import derive_session_keys, session_id


SECRET = bytes(range(32))
SOURCE_NONCE = b"\xaa" * 32
TARGET_NONCE = b"\xbb" * 32
nonces = st.binary(min_size=32, max_size=32)


class TestVectors:
    def test_pinned_keys(self):
        """Fixed secret and nonces give these keys (our own vectors: any change breaks peers)."""
        keys = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        assert keys.session_id.hex() == (
            "957242f7de7c1e2f4150c89194a18ff3b68b53531ccf24aca4a77152f74eb3df"
        )
        assert keys.data.hex() == (
            "67a476ad85250a3b52c3ed237a39c29d31878d64a7fcd9b9d49945e86f3726c2"
        )
        assert keys.manifest.hex() == (
            "2395c578fd821fca9837b9b82d3e3a2072b84f4541aaa63cc578ae8da309a103"
        )
        assert keys.control.hex() == (
            "b206ca62558274a8cc5d0f4b5fb2e5d566b0a06fb34ef4fd8224f657be03bfdd"
        )
        assert keys.memory.hex() == (
            "6ab390eea022d192706730804ad125002730ac34f340167219ac2890f99db793"
        )

    def test_session_id_is_the_keys_one(self):
        """session_id() alone agrees with the derived keys' id."""
        keys = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        assert session_id(SOURCE_NONCE, TARGET_NONCE) == keys.session_id

    def test_repr_hides_keys(self):
        """A logged SessionKeys shows the session id, never a key."""
        keys = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        assert keys.data.hex() not in repr(keys)
        assert keys.session_id.hex() in repr(keys)


class TestFreshness:
    @given(nonces, nonces, nonces)
    def test_another_nonce_gives_other_keys(self, source, target, other):
        """Changing either nonce changes every key and the session id."""
        if len({source, target, other}) < 3:
            return
        base = derive_session_keys(SECRET, source, target)
        for keys in (
            derive_session_keys(SECRET, other, target),
            derive_session_keys(SECRET, source, other),
        ):
            assert keys.session_id != base.session_id
            assert {keys.data, keys.manifest, keys.control, keys.memory}.isdisjoint(
                {base.data, base.manifest, base.control, base.memory}
            )

    def test_swapped_nonces_give_other_keys(self):
        """Roles are positional: exchanging the nonces gives unrelated keys."""
        a = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        b = derive_session_keys(SECRET, TARGET_NONCE, SOURCE_NONCE)
        assert a.data != b.data
        assert a.session_id != b.session_id

    def test_keys_differ_by_purpose(self):
        """Data, manifest, control and memory keys are four different keys."""
        keys = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        assert len({keys.data, keys.manifest, keys.control, keys.memory}) == 4

    def test_other_secret_gives_other_keys(self):
        """Another guest's secret with the same nonces shares nothing."""
        a = derive_session_keys(SECRET, SOURCE_NONCE, TARGET_NONCE)
        b = derive_session_keys(bytes(32), SOURCE_NONCE, TARGET_NONCE)
        assert a.data != b.data
        assert a.session_id == b.session_id  # the id is public: nonces only


class TestRefusals:
    @pytest.mark.parametrize(
        ("secret", "source", "target"),
        [
            (b"short", SOURCE_NONCE, TARGET_NONCE),
            (SECRET, b"\x01" * 31, TARGET_NONCE),
            (SECRET, SOURCE_NONCE, SOURCE_NONCE),
        ],
    )
    def test_bad_inputs(self, secret, source, target):
        """A short secret, a short nonce or a reflected nonce is refused."""
        with pytest.raises(ValueError, match=r"secret|nonce"):
            derive_session_keys(secret, source, target)
