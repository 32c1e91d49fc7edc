"""sev/sev-es on real QEMU: the host is checked first, and everything it lacks is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmmig.plugins.sev.qemu_host import sev_host_problems


@pytest.fixture
def sev_host(tmp_path):
    """A stand-in /dev/sev node and kvm_amd parameters directory, SEV on, SEV-ES off."""
    device = tmp_path / "sev"
    device.write_bytes(b"")
    parameters = tmp_path / "parameters"
    parameters.mkdir()
    (parameters / "sev").write_text("Y\n")
    (parameters / "sev_es").write_text("N\n")
    return device, parameters


class TestHostProblems:
    def test_an_sev_host_still_lacks_the_qemu_patches(self, sev_host):
        """Device and kvm_amd fine for SEV: what remains is named, the QEMU patches last."""
        device, parameters = sev_host
        problems = sev_host_problems(es=False, device=device, parameters=parameters)
        assert not any(str(device) in p or "kvm_amd" in p for p in problems)
        assert "qemu-patches/" in problems[-1]

    def test_sev_es_also_needs_its_kvm_parameter(self, sev_host):
        """sev_es=N is reported for SEV-ES only."""
        device, parameters = sev_host
        problems = sev_host_problems(es=True, device=device, parameters=parameters)
        assert any("kvm_amd does not enable sev-es" in p for p in problems)

    def test_a_missing_device_and_module_are_named(self, tmp_path):
        """No /dev/sev, no kvm_amd: both said, with what to do about them."""
        problems = sev_host_problems(es=False, device=tmp_path / "sev",
                                     parameters=tmp_path / "none")
        assert any("SEV firmware device is missing" in p for p in problems)
        assert any("kvm_amd does not enable sev" in p for p in problems)


def test_vmmig_run_stops_before_any_vm_with_the_list(tmp_path):
    """`vmmig run --tech sev --platform qemu` here: one line, exit 1, no report of a run."""
    result = subprocess.run([sys.executable, "-m", "vmmig", "run", "--tech", "sev",
                             "--platform", "qemu", "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("vmmig: error: technology 'sev' cannot run on qemu here; "
                                    "missing: ")
    assert "qemu-patches/" in result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
