"""The PSP's cost model: validated parameters, accounting per command, optional pacing."""

from __future__ import annotations

import math
import time

import pytest
from psp_support import FakeGuestMemory, make_psp, page, start

from vmmig.platforms.emu.psp import (
    LaunchUpdateDataRequest,
    Pacer,
    Policy,
    PspCostModel,
    PspError,
)


class TestCostModel:
    def test_defaults_are_the_documented_assumptions(self):
        """15 us per command and 50 MB/s: a 4 KiB page costs 15 us + 81.92 us."""
        model = PspCostModel()
        assert (model.latency_per_command_us, model.bytes_per_second) == (15.0, 50e6)
        assert model.seconds(4096) == pytest.approx(15e-6 + 4096 / 50e6)
        assert model.seconds() == pytest.approx(15e-6)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"latency_per_command_us": -1.0},
            {"latency_per_command_us": math.inf},
            {"bytes_per_second": 0.0},
            {"bytes_per_second": -5.0},
            {"bytes_per_second": math.nan},
        ],
    )
    def test_invalid_parameters_are_refused(self, kwargs):
        """Negative or non-finite latency, and non-positive or non-finite bandwidth, are errors."""
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            PspCostModel(**kwargs)


class TestAccounting:
    def test_each_command_adds_its_modelled_time(self, tmp_path):
        """LAUNCH_START costs the latency; LAUNCH_UPDATE_DATA of a page adds its bytes."""
        model = PspCostModel(latency_per_command_us=10.0, bytes_per_second=1e6)
        psp = make_psp(tmp_path, cost=model)
        handle, _ = start(psp, Policy())
        assert psp.modelled_seconds == pytest.approx(10e-6)
        psp.launch_update_data(LaunchUpdateDataRequest(handle, 0, page(1)), FakeGuestMemory())
        assert psp.modelled_seconds == pytest.approx(20e-6 + 4096 / 1e6)
        assert psp.command_count == 2

    def test_refused_commands_pay_the_latency(self, tmp_path):
        """A refused command still took the PSP's time."""
        psp = make_psp(tmp_path, cost=PspCostModel(latency_per_command_us=7.0))
        with pytest.raises(PspError):
            psp.launch_finish(99)
        assert psp.modelled_seconds == pytest.approx(7e-6)

    def test_the_psp_does_not_wait_unless_paced(self, tmp_path):
        """A 1-second modelled command returns at once without pace."""
        psp = make_psp(tmp_path, cost=PspCostModel(latency_per_command_us=1e6))
        began = time.monotonic()
        psp.platform_status()
        assert time.monotonic() - began < 0.5
        assert psp.modelled_seconds == pytest.approx(1.0)

    def test_a_paced_psp_waits_the_modelled_time(self, tmp_path):
        """With pace=True a 30 ms command takes at least 30 ms."""
        psp = make_psp(tmp_path, cost=PspCostModel(latency_per_command_us=30e3), pace=True)
        began = time.monotonic()
        psp.platform_status()
        assert time.monotonic() - began >= 0.03


class FakeClock:
    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


class TestPacer:
    def test_short_waits_accumulate_until_worth_a_sleep(self):
        """Sixty-six 15 us commands at one instant owe 0.99 ms: no sleep; the 67th sleeps ~1 ms."""
        clock = FakeClock()
        pacer = Pacer(clock=lambda: clock.now, sleep=clock.sleep)
        for _ in range(66):
            pacer.wait(clock.now, 15e-6)
        assert clock.sleeps == []
        pacer.wait(clock.now, 15e-6)
        assert clock.sleeps == [pytest.approx(67 * 15e-6)]

    def test_real_work_longer_than_modelled_is_not_charged_twice(self):
        """A command that already took longer than its cost does not sleep."""
        clock = FakeClock()
        pacer = Pacer(clock=lambda: clock.now, sleep=clock.sleep)
        started = clock.now
        clock.now += 0.010
        pacer.wait(started, 0.005)
        assert clock.sleeps == []

    def test_an_idle_psp_owes_nothing(self):
        """Debt does not carry over an idle gap: the PSP was free meanwhile."""
        clock = FakeClock()
        pacer = Pacer(clock=lambda: clock.now, sleep=clock.sleep)
        pacer.wait(clock.now, 0.0005)
        clock.now += 1.0
        pacer.wait(clock.now, 0.0005)
        assert clock.sleeps == []
