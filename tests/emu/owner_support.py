"""Helpers shared by the guest owner's tests; this module holds no tests."""

from __future__ import annotations

import attrs
from psp_support import FakeGuestMemory, amd_root, page

from vmmig.owner import ExpectedLaunch, LaunchKind, TrustAnchor
from vmmig.platforms.emu.psp import (
    LaunchStartRequest,
    LaunchUpdateDataRequest,
    Policy,
    launch_digest,
)


IMAGE = [(0, page(1)), (4096, page(2))]
#: The expected launch of :data:`IMAGE` as an SEV guest.
SEV = ExpectedLaunch("sev", Policy(nodbg=True), launch_digest(data for _, data in IMAGE))
#: A migration target's image (the MH alone), and its expected launch as the same guest's.
TARGET_IMAGE = [(0, page(3))]
TARGET = attrs.evolve(SEV, digest=launch_digest(data for _, data in TARGET_IMAGE),
                      kind=LaunchKind.MIGRATION_TARGET)


def trust() -> TrustAnchor:
    """The tests' AMD root, as an owner pins it."""
    return TrustAnchor(amd_root().ask_cert, amd_root().ark_cert)


def launch(psp, offer, image=IMAGE):
    """The host's part: LAUNCH_START with the offer, UPDATE_DATA, MEASURE."""
    memory = FakeGuestMemory()
    handle = psp.launch_start(LaunchStartRequest(offer.policy, offer.dh_cert,
                                                 offer.session_blob))
    for gpa, data in image:
        psp.launch_update_data(LaunchUpdateDataRequest(handle, gpa, data), memory)
    return handle, memory, psp.launch_measure(handle)
