"""The plugin host: built-ins, entry points, blocking, selection, the hook reference."""

from __future__ import annotations

import inspect
import textwrap

import pytest

from vmmig import hookimpl, hookspecs
from vmmig.config import load_plan
from vmmig.errors import PluginError, UnsupportedError
from vmmig.plugin_host import BUILTIN_PLUGINS, PluginHost
from vmmig.technology import Technology


@pytest.fixture
def toy_distribution(tmp_path, monkeypatch):
    """A third-party plugin installed the way pip installs one: a dist-info with entry points."""
    package = tmp_path / "vmmig_toy"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent('''
        from vmmig import hookimpl
        from vmmig.technology import Technology

        @hookimpl
        def vmmig_technology():
            return Technology(name="toy", summary="a toy", platforms=("emu",))

        @hookimpl
        def vmmig_prepare_target(migration):
            return None
    '''))
    dist = tmp_path / "vmmig_toy-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vmmig-toy\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[vmmig]\ntoy = vmmig_toy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy"


class TestLoading:
    def test_builtins_are_registered_by_their_short_names(self):
        """Every built-in plugin is registered under the last part of its module name."""
        host = PluginHost(entry_points=False)
        names = {info.name for info in host.plugins()}
        assert {dotted.rsplit(".", 1)[-1] for dotted in BUILTIN_PLUGINS} <= names

    def test_builtin_technologies(self):
        """plain, sev and sev-es are known technologies."""
        assert {"plain", "sev", "sev-es"} <= set(PluginHost(entry_points=False).technologies())

    def test_entry_point_plugin_is_loaded_with_its_version(self, toy_distribution):
        """A plugin installed through the vmmig entry-point group is listed with its version."""
        host = PluginHost()
        info = {i.name: i for i in host.plugins()}[toy_distribution]
        assert info.version == "1.2.3"
        assert info.distribution == "vmmig-toy"
        assert [t.name for t in info.technologies] == ["toy"]
        assert "vmmig_prepare_target" in info.hooks

    def test_disabled_plugin_is_not_loaded(self, toy_distribution):
        """--disable-plugin blocks an entry-point plugin before it is loaded."""
        host = PluginHost(disabled=[toy_distribution])
        assert "toy" not in host.technologies()

    def test_disabled_builtin_by_environment(self, monkeypatch):
        """VMMIG_DISABLE_PLUGINS blocks built-ins too."""
        monkeypatch.setenv("VMMIG_DISABLE_PLUGINS", "sev, sev_es")
        techs = PluginHost(entry_points=False).technologies()
        assert "sev" not in techs
        assert "sev-es" not in techs
        assert "plain" in techs

    def test_hook_without_spec_is_rejected(self):
        """A plugin implementing an unknown hook fails validation with its name."""

        class Typo:
            @hookimpl
            def vmmig_prepare_targett(self, migration):
                return None

        host = PluginHost(entry_points=False)
        host.pm.register(Typo(), name="typo")
        with pytest.raises(Exception, match="vmmig_prepare_targett"):
            host.pm.check_pending()


class TestSelection:
    def test_unknown_technology_names_the_available_ones(self):
        """Selecting an unknown technology says which ones exist."""
        with pytest.raises(UnsupportedError, match=r"unknown technology 'tdx'.*plain"):
            PluginHost(entry_points=False).select("tdx", "qemu")

    def test_wrong_platform_is_refused(self, toy_distribution):
        """A technology selected on a platform it does not support is refused, naming both."""
        with pytest.raises(UnsupportedError, match="does not run on platform 'qemu'"):
            PluginHost().select("toy", "qemu")

    def test_a_feature_the_technology_lacks_on_the_platform_is_refused(self):
        """multifd is QEMU's: plain has it on qemu, not on emu, and says so before any VM."""
        host = PluginHost(entry_points=False)
        assert host.select("plain", "qemu", ["multifd", "auto-converge"]) is not None
        with pytest.raises(UnsupportedError, match="'plain' on emu does not support multifd"):
            host.select("plain", "emu", ["auto-converge", "multifd"])

    def test_missing_required_hooks_are_named(self, toy_distribution):
        """A technology lacking required step hooks is refused before any VM starts."""
        with pytest.raises(PluginError, match="vmmig_transfer_memory"):
            PluginHost().select("toy", "emu")

    def test_an_unavailable_technology_says_why(self):
        """A technology listed as unavailable refuses to run, with its own reason."""

        class Draft:
            @hookimpl
            def vmmig_technology(self):
                return Technology(name="tdx", summary="Intel TDX", platforms=("emu",),
                                  unavailable="not implemented yet")

        host = PluginHost(entry_points=False)
        host.pm.register(Draft(), name="draft")
        with pytest.raises(UnsupportedError, match=r"tdx.*not implemented yet"):
            host.select("tdx", "emu")

    def test_sev_es_offers_no_psp_strategy(self):
        """Its PSP path (SEND_UPDATE_VMSA) is not wired in: asking is refused up front."""
        with pytest.raises(UnsupportedError, match="psp-strategy"):
            PluginHost(entry_points=False).select("sev-es", "emu", ["psp-strategy"])

    def test_an_sev_option_asked_of_plain_is_refused_before_any_vm_starts(self):
        """plain has no PSP strategy and no MH queues: asking is an error, not ignored."""
        with pytest.raises(UnsupportedError, match="psp-strategy, mh-queues"):
            PluginHost(entry_points=False).select("plain", "emu", ["psp-strategy", "mh-queues"])

    def test_two_plugins_claiming_one_technology_are_refused(self):
        """Two providers of one technology name are an error naming both plugins."""

        class Impostor:
            @hookimpl
            def vmmig_technology(self):
                return Technology(name="plain", summary="again", platforms=("qemu",))

        host = PluginHost(entry_points=False)
        host.pm.register(Impostor(), name="impostor")
        with pytest.raises(PluginError, match=r"'plain'.*'impostor'"):
            host.technologies()


class TestReference:
    def test_every_hook_is_documented(self):
        """Every hookspec has a docstring describing its parameters (the plugin reference)."""
        host = PluginHost(entry_points=False)
        hooks = [name for name in dir(host.pm.hook) if name.startswith("vmmig_")]
        assert hooks
        for name in hooks:
            spec = getattr(hookspecs, name)
            doc = inspect.getdoc(spec) or ""
            assert len(doc.splitlines()) >= 3, name
            for param in inspect.signature(spec).parameters:
                assert f":param {param}:" in doc, (name, param)


class TestDefaultPlatform:
    @pytest.mark.parametrize(("tech", "platform"), [("plain", "qemu"), ("sev", "emu"),
                                                    ("sev-es", "emu"), ("nonesuch", "qemu")])
    def test_a_plan_without_a_platform_takes_the_technologys_first(self, tech, platform):
        """`vmmig run --tech sev-es` runs on the emulated platform: QEMU cannot run it."""
        host = PluginHost(entry_points=False)
        plan = load_plan(None, {"tech": tech}, platform_for=host.default_platform)
        assert plan.platform == platform

    def test_a_platform_named_by_the_plan_wins(self):
        host = PluginHost(entry_points=False)
        plan = load_plan(None, {"tech": "sev-es", "platform": "qemu"},
                         platform_for=host.default_platform)
        assert plan.platform == "qemu"
