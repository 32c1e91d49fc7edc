"""Finding QEMU, checking KVM and choosing the accelerator."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmmig.errors import ConfigError, HostRequirementError
from vmmig.platforms.qemu import host
from vmmig.platforms.qemu.host import Accel, choose_accel, find_qemu, kvm_status


pytestmark = pytest.mark.qemu


def fake_qemu(tmp_path: Path, output: str) -> Path:
    """Write an executable that prints ``output`` like ``qemu --version`` would."""
    script = tmp_path / "qemu-system-x86_64"
    script.write_text(f"#!/bin/sh\necho '{output}'\n")
    script.chmod(0o755)
    return script


class TestFindQemu:
    def test_finds_the_installed_qemu_and_its_version(self):
        """The real qemu-system-x86_64 on PATH is found, with the version it reports."""
        qemu = find_qemu()
        assert qemu.path.is_absolute()
        assert os.access(qemu.path, os.X_OK)
        assert qemu.version >= (7, 0, 0)
        first_line = subprocess.run([qemu.path, "--version"], capture_output=True, text=True,
                                    check=True).stdout.splitlines()[0]
        assert first_line.startswith(f"QEMU emulator version {'.'.join(map(str, qemu.version))}")

    def test_accepts_an_explicit_path(self):
        """A binary given by path is used as it is."""
        installed = find_qemu()
        assert find_qemu(str(installed.path)) == installed

    def test_refuses_a_qemu_older_than_7_0(self, tmp_path):
        """A QEMU 6.2 is refused with its version, its path and the minimum."""
        script = fake_qemu(tmp_path, "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)")
        with pytest.raises(HostRequirementError) as info:
            find_qemu(str(script))
        assert str(info.value) == (
            f"QEMU 6.2.0 at {script} is too old; vmmig needs QEMU 7.0 or newer"
        )

    def test_accepts_a_version_without_micro_number(self, tmp_path):
        """``QEMU emulator version 8.1`` reads as 8.1.0."""
        script = fake_qemu(tmp_path, "QEMU emulator version 8.1")
        assert find_qemu(str(script)).version == (8, 1, 0)

    def test_refuses_a_binary_whose_version_it_cannot_read(self, tmp_path):
        """A binary that does not print a QEMU version is refused, quoting what it printed."""
        script = fake_qemu(tmp_path, "hello")
        with pytest.raises(HostRequirementError, match=r"cannot read the QEMU version .*'hello'"):
            find_qemu(str(script))

    def test_explains_how_to_install_qemu_when_it_is_missing(self, tmp_path, monkeypatch):
        """Without QEMU on PATH the error names the binary and the Debian package."""
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(HostRequirementError) as info:
            find_qemu()
        assert str(info.value) == (
            "qemu-system-x86_64 not found on PATH; install QEMU (Debian package qemu-system-x86)"
        )

    def test_names_a_missing_explicit_binary(self, tmp_path):
        """A binary given by a path that does not exist is named in the error."""
        missing = tmp_path / "no-such-qemu"
        with pytest.raises(HostRequirementError, match=f"{missing} not found"):
            find_qemu(str(missing))


class TestKvmStatus:
    def test_a_missing_device_is_unusable(self, tmp_path):
        """A device node that does not exist is reported missing."""
        device = tmp_path / "kvm"
        assert kvm_status(device) == (False, f"{device} missing")

    def test_a_device_that_is_not_kvm_is_unusable(self):
        """A device that does not answer KVM_GET_API_VERSION is not taken for KVM."""
        assert kvm_status(Path("/dev/null")) == (False, "/dev/null: not a KVM device")

    def test_reports_this_host(self):
        """The real /dev/kvm is either usable or unusable with a reason naming it."""
        usable, reason = kvm_status()
        assert reason.startswith("/dev/kvm")
        assert usable == (reason == "/dev/kvm usable")


class TestChooseAccel:
    def test_tcg_is_always_available(self, monkeypatch):
        """TCG is chosen when asked for, without even looking at KVM."""
        monkeypatch.setattr(host, "kvm_status", pytest.fail)
        assert choose_accel("tcg") == Accel("tcg", "TCG (requested)")

    def test_kvm_when_requested_and_usable(self, monkeypatch):
        """Requested KVM is chosen when /dev/kvm works."""
        monkeypatch.setattr(host, "kvm_status", lambda: (True, "/dev/kvm usable"))
        assert choose_accel("kvm") == Accel("kvm", "KVM (/dev/kvm usable)")

    def test_requested_kvm_that_is_unusable_is_an_error_saying_why(self, monkeypatch):
        """Requested KVM that does not work stops vmmig with the reason."""
        monkeypatch.setattr(host, "kvm_status", lambda: (False, "/dev/kvm: permission denied"))
        with pytest.raises(HostRequirementError) as info:
            choose_accel("kvm")
        assert str(info.value) == "KVM was requested but is not usable: /dev/kvm: permission denied"

    def test_auto_prefers_kvm(self, monkeypatch):
        """``auto`` takes KVM when it works."""
        monkeypatch.setattr(host, "kvm_status", lambda: (True, "/dev/kvm usable"))
        assert choose_accel("auto") == Accel("kvm", "KVM (/dev/kvm usable)")

    def test_auto_falls_back_to_tcg_saying_why(self, monkeypatch):
        """``auto`` without a working KVM takes TCG and keeps the reason."""
        monkeypatch.setattr(host, "kvm_status", lambda: (False, "/dev/kvm missing"))
        assert choose_accel("auto") == Accel("tcg", "TCG (/dev/kvm missing)")

    def test_an_unknown_accelerator_is_a_config_error(self):
        """A name other than auto, kvm or tcg is refused as configuration."""
        with pytest.raises(ConfigError, match="accel: unknown accelerator 'hvf'"):
            choose_accel("hvf")  # type: ignore[arg-type]
