"""The migration plan: TOML, command-line overrides, validation with one clear line."""

from __future__ import annotations

import pytest

from vmmig.config import MigrationPlan, load_plan, parse_size, requested_features
from vmmig.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


class TestSizes:
    @pytest.mark.parametrize(("text", "size"), [
        ("1G", 1 << 30), ("512M", 512 << 20), ("1GiB", 1 << 30), ("64k", 64 << 10),
        (256, 256 << 20), ("256", 256 << 20), ("4096B", 4096),
    ])
    def test_sizes_parse_like_qemu(self, text, size):
        """Sizes take K/M/G/T suffixes, B alone is bytes; a bare number is MiB, as QEMU's -m."""
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["1X", "", "-1G", True, 1.5])
    def test_bad_sizes_are_refused(self, text):
        """Anything else is a ValueError with the offending value."""
        with pytest.raises(ValueError, match="size"):
            parse_size(text)


class TestLoading:
    def test_defaults(self):
        """No file and no options give the documented defaults."""
        plan = load_plan()
        assert plan == MigrationPlan()
        assert plan.downtime_limit == 300
        assert plan.bandwidth == 0

    def test_toml_fields_are_loaded_and_converted(self, tmp_path):
        """Every TOML key is the option's name; values are converted to their types."""
        plan = load_plan(write(tmp_path, 'memory = "2G"\ndowntime-limit = 50\n'
                                         'auto-converge = true\nbandwidth = 1024\n'))
        assert (plan.memory, plan.downtime_limit, plan.auto_converge, plan.bandwidth) == (
            2 << 30, 50, True, 1024)

    def test_command_line_overrides_the_file(self, tmp_path):
        """An option given on the command line wins over the file."""
        plan = load_plan(write(tmp_path, "downtime-limit = 50\n"), {"downtime-limit": "75"})
        assert plan.downtime_limit == 75

    def test_plan_is_frozen(self):
        """A loaded plan cannot be changed."""
        plan = load_plan()
        with pytest.raises(AttributeError):
            plan.memory = 1  # type: ignore[misc]


class TestErrors:
    @pytest.mark.parametrize(("text", "message"), [
        ("downtime-limit = 0\n", "downtime-limit: must be at least 1 ms, got 0"),
        ('memory = "lots"\n', "memory: expected a size"),
        ('platform = "xen"\n', "platform: expected one of qemu, emu, got 'xen'"),
        ("colour = 1\n", "colour: unknown field"),
        ("auto-converge = 3\n", "auto-converge: expected true or false"),
        ('migrate-uri = "http://x"\n', "migrate-uri: expected tcp:HOST:PORT"),
    ])
    def test_bad_file_field_names_file_and_field(self, tmp_path, text, message):
        """A bad field in the file raises one line naming the file, the field and the problem."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as info:
            load_plan(path)
        assert str(info.value).startswith(f"{path}: ")
        assert message in str(info.value)
        assert "\n" not in str(info.value)

    def test_bad_option_names_the_option(self):
        """A bad command-line value names the option."""
        with pytest.raises(ConfigError, match=r"^--vcpus: must be from 1 to 64, got 0$"):
            load_plan(None, {"vcpus": "0"})

    def test_broken_toml_is_reported(self, tmp_path):
        """A file that is not TOML says so."""
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_plan(write(tmp_path, "memory = [\n"))

    def test_missing_file_is_reported(self, tmp_path):
        """A missing plan file is named."""
        with pytest.raises(ConfigError, match="cannot read the plan"):
            load_plan(tmp_path / "nope.toml")


class TestRequestedFeatures:
    def test_a_default_plan_asks_for_no_optional_feature(self):
        """Defaults (two MH queues, the MH strategy included) ask nothing of plain."""
        assert requested_features(load_plan()) == ()

    @pytest.mark.parametrize(("option", "value", "feature"), [
        ("auto-converge", "true", "auto-converge"), ("bandwidth", "100", "bandwidth"),
        ("multifd-channels", "2", "multifd"), ("strategy", "psp", "psp-strategy"),
        ("mh-queues", "1", "mh-queues"), ("mh-queues", "4", "mh-queues")])
    def test_an_option_off_its_default_asks_for_its_feature(self, option, value, feature):
        assert requested_features(load_plan(None, {option: value})) == (feature,)
