"""Fixtures shared by the emulated platform's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One build cache for the guest programs of the whole run."""
    return tmp_path_factory.mktemp("guest-cache")
