"""Fixtures every test gets."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test():
    """Collect after every test, so that a socket or file it leaked is reported against
    it (ResourceWarning is an error here), not against whichever test runs when the
    collector happens to pass."""
    yield
    gc.collect()
