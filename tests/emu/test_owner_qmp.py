"""The guest owner's launch over QMP against ``vmmig emu start -S`` processes.

The owner writes the launch files before the machine starts, then
:func:`attest_and_inject` drives QEMU's SEV commands: the same code would
face a real PSP through QEMU.
"""

from __future__ import annotations

import asyncio
import base64

import pytest
from psp_support import amd_root, make_psp
from sev_support import MEMORY, machine_process

from vmmig.owner import (
    AttestationError,
    GuestOwner,
    LaunchKind,
    Refusal,
    TrustAnchor,
    attest_and_inject,
    expected_launch_for,
    launch_files,
)
from vmmig.platforms.emu.sev_launch import SECRET_AREA


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    hosts = tmp_path_factory.mktemp("owner-qmp-hosts")
    return hosts / "host-a", make_psp(hosts, "host-a")


def make_owner(tmp_path, tech: str, workload: str = "ab") -> GuestOwner:
    """An owner expecting ``web-1`` to boot with ``workload``, and as a migration target."""
    owner = GuestOwner.open(tmp_path / "owner",
                            TrustAnchor(amd_root().ask_cert, amd_root().ark_cert))
    for mh_target in (False, True):
        owner.expect("web-1", expected_launch_for(tech, memory=MEMORY, vcpus=2,
                                                  workload=workload, mh_target=mh_target))
    return owner


async def secret_area(client) -> bytes:
    reply = await client.execute("x-memory-read", {"gpa": SECRET_AREA[0], "size": 256})
    return base64.b64decode(reply["data"])


@pytest.mark.parametrize("tech", ["sev", "sev-es"])
def test_the_owner_attests_injects_and_the_guest_runs(tmp_path, host, tech):
    """Launch files, -S start, attest_and_inject, cont: the guest runs with its secret."""
    host_dir, psp = host
    owner = make_owner(tmp_path, tech)
    files = launch_files(owner, "web-1", psp.chain, tmp_path)

    async def scenario():
        async with machine_process(tmp_path, "--host-dir", str(host_dir), "--tech", tech,
                                   *files.emu_options()) as client:
            before = await secret_area(client)
            measurement = await attest_and_inject(owner, "web-1", client.execute,
                                                  session=files.offer.session)
            assert len(measurement.mnonce) == 16
            after = await secret_area(client)
            assert after != before, "the secret area did not change"
            assert owner.state.master_secret("web-1")[:16] not in after
            with client.listener("RESUME") as events:
                await client.execute("cont")
                await asyncio.wait_for(events.get(), 10)
            assert (await client.execute("query-sev"))["state"] == "running"

    asyncio.run(scenario())
    assert [e.granted for e in owner.audit.events] == [True, True, True, True]


def test_another_workload_gets_nothing_injected(tmp_path, host):
    """The owner expects the idle firmware, the host launched ab: refused, then replayed;
    the secret area is untouched and the guest still awaits its secret."""
    host_dir, psp = host
    owner = make_owner(tmp_path, "sev", workload="idle")
    files = launch_files(owner, "web-1", psp.chain, tmp_path)

    async def scenario():
        async with machine_process(tmp_path, "--host-dir", str(host_dir), "--tech", "sev",
                                   *files.emu_options()) as client:
            before = await secret_area(client)
            for reason in (Refusal.MEASUREMENT_MISMATCH, Refusal.REPLAYED_SESSION):
                with pytest.raises(AttestationError) as info:
                    await attest_and_inject(owner, "web-1", client.execute,
                                            session=files.offer.session)
                assert info.value.reason is reason
            assert await secret_area(client) == before
            assert (await client.execute("query-sev"))["state"] == "launch-secret"

    asyncio.run(scenario())


def test_a_migration_target_launch_is_attested_against_the_target_expectation(tmp_path, host):
    """``vmmig emu start --incoming --mh-target`` with a migration-target session's files:
    the owner measures the MH-only image and injects the secret."""
    host_dir, psp = host
    owner = make_owner(tmp_path, "sev")
    files = launch_files(owner, "web-1", psp.chain, tmp_path, kind=LaunchKind.MIGRATION_TARGET)

    async def scenario():
        async with machine_process(tmp_path, "--host-dir", str(host_dir), "--tech", "sev",
                                   "--incoming", "--mh-target", *files.emu_options()) as client:
            await attest_and_inject(owner, "web-1", client.execute,
                                    session=files.offer.session)
            assert (await client.execute("query-status"))["status"] == "inmigrate"

    asyncio.run(scenario())
    assert [(e.action, e.granted) for e in owner.audit.events][-2:] == [
        ("start-launch", True), ("release-secret", True)]
