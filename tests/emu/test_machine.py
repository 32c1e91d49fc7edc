"""The emulated machine, driven through its command handlers (the QMP layer is tested apart)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from qemu.qmp import QMPClient

from vmmig.errors import ConfigError
from vmmig.guests.ab_check import ab_passes, check_ab
from vmmig.guests.emu import DirtyParams
from vmmig.platforms.emu.machine import Machine, MachineConfig, program_for
from vmmig.platforms.emu.qmp_schema import QmpCommandError


MIB = 1 << 20


@pytest.fixture
def machines(tmp_path):
    made = []

    def make(**kwargs):
        machine = Machine(MachineConfig(**{"name": "vm", "memory": 16 * MIB,
                                           "run_dir": tmp_path, **kwargs}))
        made.append(machine)
        return machine

    yield make
    for machine in made:
        machine.close()


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class TestRunState:
    def test_a_new_machine_is_paused_until_started(self, machines):
        """A machine starts paused; start runs its workload; stop and cont follow QEMU's states."""
        machine = machines()
        assert machine.query_status()["status"] == "paused"
        machine.start()
        assert machine.query_status() == {"status": "running", "running": True,
                                          "singlestep": False}
        wait_for(lambda: ab_passes(machine.memory.ram) >= 2)
        assert machine.console.text.startswith("A")
        machine.stop()
        assert machine.query_status()["status"] == "paused"
        assert check_ab(machine.memory.ram).ok

    def test_an_incoming_machine_waits_for_its_state(self, machines):
        """A target has no program: it cannot run until vCPU state is imported."""
        machine = machines(incoming=True)
        assert machine.query_status()["status"] == "inmigrate"
        with pytest.raises(QmpCommandError, match="no state to run"):
            machine.cont()


class TestStateTransfer:
    def test_memory_and_vcpu_state_continue_on_another_machine(self, machines):
        """RAM copied and VMSAs imported: the guest continues on the target by the a-b rule."""
        source, target = machines(name="src"), machines(name="dst", incoming=True)
        source.start()
        wait_for(lambda: ab_passes(source.memory.ram) >= 1)
        source.stop()
        target.memory.pages[:] = source.memory.pages
        target.vcpu_state_import(source.vcpu_state_export())
        passes = ab_passes(target.memory.ram)
        target.cont()
        wait_for(lambda: ab_passes(target.memory.ram) > passes + 1)
        target.stop()
        assert check_ab(target.memory.ram).ok

    def test_state_of_a_running_guest_is_refused(self, machines):
        """Registers are exported only from a stopped guest."""
        machine = machines()
        machine.start()
        with pytest.raises(QmpCommandError, match="running guest"):
            machine.vcpu_state_export()


class TestDirtyLog:
    def test_sync_writes_the_dirty_page_numbers(self, machines):
        """After a sync the dirty file starts with exactly the pages the guest wrote."""
        machine = machines()
        machine.dirty_log_start()
        machine.dirty_log_sync()
        machine.memory.ram[9 * 4096 + 7] = 1
        machine.memory.ram[5 * 4096] = 1
        assert machine.dirty_log_sync() == {"dirty": 2}
        listed = np.fromfile(machine.query_memory()["dirty-pages-path"], dtype="<u8", count=2)
        assert listed.tolist() == [5, 9]
        assert machine.dirty_log_sync() == {"dirty": 0}

    def test_sync_without_start_is_an_error(self, machines):
        """Syncing a log that was never started is refused."""
        with pytest.raises(QmpCommandError, match="not started"):
            machines().dirty_log_sync()


class TestWorkloads:
    @pytest.mark.parametrize(("workload", "program"), [
        ("ab", "ab64"), ("fill", "ab64"), ("regs", "regs"), ("idle", "idle"),
        ("dirty:64M", "dirty"),
    ])
    def test_workloads_name_their_programs(self, workload, program):
        """Each plan workload maps to a guest program."""
        assert program_for(workload)[0] == program

    @pytest.mark.parametrize(("workload", "pattern"), [
        ("dirty:64M", "sequential"), ("dirty:64M:sequential", "sequential"),
        ("dirty:1G:random", "random"),
    ])
    def test_the_dirtier_takes_its_pattern_from_the_workload(self, workload, pattern):
        """dirty:RATE[:random] chooses the order in which new pages are dirtied."""
        params = program_for(workload)[1]
        assert isinstance(params, DirtyParams)
        assert params.pattern == pattern

    @pytest.mark.parametrize("workload", ["dirty:lots", "fork-bomb", "dirty:64M:zigzag", "dirty:0"])
    def test_unknown_workloads_are_refused(self, workload):
        """Bad workloads name the field and the choices."""
        with pytest.raises(ConfigError, match="workload"):
            program_for(workload)


class TestProcess:
    def test_vmmig_emu_start_serves_qmp_to_qemu_qmp(self, tmp_path):
        """`vmmig emu start` is a process that qemu.qmp drives like QEMU: status, stop, quit."""
        qmp_path = tmp_path / "vm.qmp"
        process = subprocess.Popen([sys.executable, "-m", "vmmig", "emu", "start", "--memory",
                                    "32M", "--qmp", str(qmp_path)], stderr=subprocess.PIPE)

        async def drive():
            client = QMPClient("test")
            deadline = time.monotonic() + 30
            while not qmp_path.exists():
                assert process.poll() is None, process.stderr.read().decode()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await client.connect(str(qmp_path))
            assert (await client.execute("query-status"))["status"] == "running"
            with client.listener("STOP") as events:
                await client.execute("stop")
                assert (await asyncio.wait_for(events.get(), 10))["event"] == "STOP"
            memory = await client.execute("x-query-memory")
            assert memory["size"] == 32 * MIB
            assert check_ab(Path(memory["ram-path"]).read_bytes()).ok
            await client.execute("quit")
            with contextlib.suppress(EOFError):  # qemu.qmp sees the hang-up, as after QEMU's quit
                await client.disconnect()

        with process:  # closes the stderr pipe on the way out
            try:
                asyncio.run(drive())
                assert process.wait(30) == 0
            finally:
                process.kill()
        assert not list(tmp_path.iterdir()), "the machine left files behind"
