"""``vmmig owner serve`` as a real process on a unix socket, reached with OwnerClient."""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest
from owner_support import SEV, TARGET, TARGET_IMAGE, launch, trust
from psp_support import make_psp

from vmmig.cli import main
from vmmig.errors import PlatformError
from vmmig.firmware.image import builtin_image
from vmmig.owner import (
    AttestationError,
    GuestOwner,
    LaunchKind,
    OwnerClient,
    Refusal,
    expected_launch_for,
)
from vmmig.owner.protocol import MAX_LINE
from vmmig.platforms.emu.psp import LaunchSecretRequest


@pytest.fixture(scope="module")
def psp(tmp_path_factory):
    return make_psp(tmp_path_factory.mktemp("owner-service-hosts"))


def _stderr_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's next stderr line, within ``timeout`` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stderr, selectors.EVENT_READ)
        assert selector.select(timeout), "the owner said nothing"
    return process.stderr.readline().decode()


@pytest.fixture
def served(tmp_path):
    """A served owner expecting ``web-1``: yields (address, state directory)."""
    state = tmp_path / "owner"
    GuestOwner.open(state, trust()).expect("web-1", SEV)
    socket_path = tmp_path / "owner.sock"
    argv = [sys.executable, "-m", "vmmig", "owner", "serve", "--state", str(state),
            "--listen", f"unix:{socket_path}"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE) as process:
        try:
            assert "serving" in _stderr_line(process, 30)
            yield f"unix:{socket_path}", state
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0
            assert not socket_path.exists()
        finally:
            process.kill()


def test_a_launch_through_the_service(served, psp):
    """start-launch and release-secret over the socket; the PSP takes the packet."""
    address, state = served
    with OwnerClient(address) as client:
        offer = client.start_launch("web-1", psp.chain)
        handle, memory, measurement = launch(psp, offer)
        header, ciphertext = client.release_secret("web-1", offer.session,
                                                   measurement.to_bytes(), psp.firmware,
                                                   platform_pdh=psp.chain.pdh)
    psp.launch_secret(LaunchSecretRequest(handle, header, ciphertext, 0x8000), memory)
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert [(e["action"], e["granted"]) for e in audit][-2:] == [
        ("start-launch", True), ("release-secret", True)]


def test_refusals_cross_the_wire_as_attestation_errors(served, psp, tmp_path):
    """The client raises the owner's AttestationError with its reason."""
    address, _ = served
    with OwnerClient(address) as client:
        offer = client.start_launch("web-1", psp.chain)
        launch(psp, offer)
        for reason in (Refusal.MEASUREMENT_MISMATCH, Refusal.REPLAYED_SESSION):
            with pytest.raises(AttestationError) as info:
                client.release_secret("web-1", offer.session, bytes(48), psp.firmware)
            assert (info.value.reason, info.value.guest) == (reason, "web-1")
        with pytest.raises(AttestationError) as info:
            client.start_launch("nobody", psp.chain)
        assert info.value.reason is Refusal.UNKNOWN_GUEST


def test_the_launch_kind_travels_over_the_service(served, psp):
    """A target session is refused until the target expectation exists, then measured by it."""
    address, state = served
    with OwnerClient(address) as client:
        with pytest.raises(AttestationError, match="no expected migration-target launch"):
            client.start_launch("web-1", psp.chain, kind=LaunchKind.MIGRATION_TARGET)
        GuestOwner.open(state).expect("web-1", TARGET)
        offer = client.start_launch("web-1", psp.chain, kind=LaunchKind.MIGRATION_TARGET)
        _, _, measurement = launch(psp, offer, TARGET_IMAGE)
        client.release_secret("web-1", offer.session, measurement.to_bytes(), psp.firmware)


def _raw(address: str, payload: bytes) -> list[dict]:
    """Send ``payload`` on a fresh connection, then EOF; every line until the server closes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(address.partition(":")[2])
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        with sock.makefile("rb") as lines:
            return [json.loads(line) for line in lines]


@pytest.mark.parametrize(("payload", "desc"), [
    (b"not json\n", "not JSON"),
    (b"[1]\n", "a JSON object"),
    (b'{"x": "' + b"a" * MAX_LINE + b'"}\n', "at most 65536 bytes"),
])
def test_a_malformed_line_is_answered_and_the_connection_closed(served, payload, desc):
    """One ProtocolError line, then the server closes the connection."""
    greeting, reply = _raw(served[0], payload)
    assert greeting["vmmig-owner"]["version"] == 1
    assert reply["error"]["class"] == "ProtocolError"
    assert desc in reply["error"]["desc"]


def test_an_unknown_operation_or_argument_is_a_protocol_error(served):
    """The connection stays open after a well-formed but wrong request."""
    _, unknown, missing, kind = _raw(
        served[0], b'{"execute": "expect"}\n'
                   b'{"execute": "start-launch", "arguments": {}}\n'
                   b'{"execute": "start-launch", "arguments": {"guest": "web-1", "pdh": "",'
                   b' "cert-chain": "", "kind": "reboot"}}\n')
    assert "unknown operation 'expect'" in unknown["error"]["desc"]
    assert "argument 'guest'" in missing["error"]["desc"]
    assert kind["error"] == {"class": "ProtocolError", "desc": "argument 'kind' must be one "
                                                               "of boot, migration-target"}


def test_owner_expect_records_an_emulated_machines_launch(tmp_path, capsys):
    """``vmmig owner expect`` needs a pinned root, and refuses a policy without NODBG."""
    state = tmp_path / "owner"
    argv = ["owner", "expect", "--state", str(state), "--guest", "web-1", "--tech", "sev",
            "--memory", "16M"]
    assert main(argv) == 2
    assert "trusts no AMD root yet" in capsys.readouterr().err
    GuestOwner.open(state, trust())
    assert main(argv) == 0
    assert GuestOwner.open(state).state.expected("web-1").tech == "sev"
    assert main([*argv, "--policy", "0x0"]) == 1
    assert "lacks NODBG" in capsys.readouterr().err


def test_owner_expect_mh_target_records_the_migration_targets_launch(tmp_path):
    """``--mh-target`` files the target's expectation under targets/, not the boot's;
    ``--firmware`` and ``--mh-queues`` are vmmig emu start's."""
    state = tmp_path / "owner"
    GuestOwner.open(state, trust())
    firmware = builtin_image().replace(b"MigrationHandler", b"MigrationHandlex", 1)
    (tmp_path / "mh.bin").write_bytes(firmware)
    argv = ["owner", "expect", "--state", str(state), "--guest", "web-1", "--tech", "sev",
            "--memory", "16M", "--mh-target", "--mh-queues", "2",
            "--firmware", str(tmp_path / "mh.bin")]
    assert main(argv) == 0
    assert [path.name for path in (state / "targets").iterdir()] == ["web-1.json"]
    assert not (state / "guests" / "web-1.json").exists()
    target = expected_launch_for("sev", memory=16 << 20, vcpus=1, workload="ab", mh_queues=2,
                                 mh_target=True, firmware=firmware)
    assert GuestOwner.open(state).state.expected("web-1", LaunchKind.MIGRATION_TARGET) == target


def test_no_owner_at_the_address_is_a_platform_error(tmp_path, psp):
    """A client of a missing owner fails in one line."""
    client = OwnerClient(f"unix:{tmp_path / 'none.sock'}", timeout=2)
    started = time.monotonic()
    with pytest.raises(PlatformError, match="guest owner: cannot connect"):
        client.start_launch("web-1", psp.chain)
    assert time.monotonic() - started < 5
