"""Starting, driving and ending real QEMU processes.

Machines run with KVM when /dev/kvm is usable and with TCG otherwise; a test
about one accelerator uses TCG, which every host has. No guest is booted:
SeaBIOS finds no disk and waits, which is all a lifecycle test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmmig.errors import PlatformError
from vmmig.platforms.fleet import Fleet
from vmmig.platforms.qemu import (
    Accel,
    QemuBinary,
    QemuMachine,
    QemuMachineSpec,
    choose_accel,
    find_qemu,
    qemu_argv,
)
from vmmig.platforms.qmp_process import default_workdir


pytestmark = pytest.mark.qemu

T = TypeVar("T")

TCG = Accel("tcg", "TCG (chosen by the test)")
KVM = Accel("kvm", "KVM (chosen by the test)")
MiB = 1 << 20
SRC = Path(__file__).resolve().parents[2] / "src"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test body in a fresh event loop."""
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def binary() -> QemuBinary:
    return find_qemu()


@pytest.fixture(scope="module")
def accel() -> Accel:
    """KVM when this host has a usable one, TCG otherwise."""
    return choose_accel("auto")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = default_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_spec(accel: Accel, name: str = "source", **changes: Any) -> QemuMachineSpec:
    return QemuMachineSpec(**{"name": name, "memory_mib": 32, "accel": accel, **changes})


async def launch(fleet: Fleet, spec: QemuMachineSpec, binary: QemuBinary) -> QemuMachine:
    return await fleet.launch(spec.name, lambda workdir: QemuMachine.launch(spec, workdir, binary))


@contextlib.asynccontextmanager
async def started(spec: QemuMachineSpec, workdir: Path, binary: QemuBinary
                  ) -> AsyncIterator[QemuMachine]:
    machine = await QemuMachine.launch(spec, workdir, binary)
    try:
        yield machine
    finally:
        await machine.shutdown()


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` exits within ``timeout`` (it need not be our child)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    return bool(readable)


class TestCommandLine:
    def test_kvm_machines_have_no_kvmclock(self, binary, workdir):
        """With KVM the CPU lacks kvmclock, whose page KVM rewrites on a paused guest."""
        argv = qemu_argv(make_spec(KVM), workdir, binary)
        assert argv[argv.index("-cpu") + 1] == "qemu64,kvmclock=off"
        assert argv[argv.index("-accel") + 1] == "kvm"

    def test_tcg_machines_use_the_plain_cpu_model(self, binary, workdir):
        """With TCG the CPU model is plain qemu64."""
        argv = qemu_argv(make_spec(TCG), workdir, binary)
        assert argv[argv.index("-cpu") + 1] == "qemu64"
        assert argv[argv.index("-accel") + 1] == "tcg"

    def test_guest_ram_is_a_shared_file_in_the_workdir(self, binary):
        """RAM is backed by <workdir>/<name>.ram, shared, with commas in paths escaped."""
        argv = qemu_argv(make_spec(TCG, memory_mib=64), Path("/w,d"), binary)
        assert argv[argv.index("-object") + 1] == (
            "memory-backend-file,id=ram0,size=64M,mem-path=/w,,d/source.ram,share=on"
        )
        assert argv[argv.index("-machine") + 1] == "pc,memory-backend=ram0"

    def test_extra_arguments_come_last(self, binary, workdir):
        """Extra arguments follow everything vmmig sets, so they can add to it."""
        argv = qemu_argv(make_spec(TCG, paused=True, extra_args=("-no-reboot",)), workdir, binary)
        assert argv[-2:] == ["-S", "-no-reboot"]


class TestLaunch:
    def test_a_launched_machine_runs(self, binary, accel, workdir):
        """A machine started without -S is running, and its files are in the workdir."""
        async def body() -> None:
            async with started(make_spec(accel), workdir, binary) as machine:
                assert await machine.status() == "running"
                assert not machine.exited
                assert machine.returncode is None
                assert machine.ram_path == workdir / "source.ram"
                assert machine.ram_path.stat().st_size == 32 * MiB
                assert machine.serial_path == workdir / "source.serial"
                assert machine.serial_path.exists()
                assert Path(f"/proc/{machine.pid}").exists()
        run(body())

    def test_a_paused_machine_waits_in_prelaunch(self, binary, accel, workdir):
        """A machine started with paused=True has not run yet."""
        async def body() -> str:
            async with started(make_spec(accel, paused=True), workdir, binary) as machine:
                return await machine.status()
        assert run(body()) == "prelaunch"

    def test_an_incoming_machine_waits_for_a_migration(self, binary, accel, workdir):
        """A machine started with incoming="defer" is in state inmigrate."""
        async def body() -> str:
            async with started(make_spec(accel, incoming="defer"), workdir, binary) as machine:
                return await machine.status()
        assert run(body()) == "inmigrate"

    def test_qemus_own_error_is_reported(self, binary, accel, workdir):
        """QEMU refusing its arguments fails the launch with QEMU's own words."""
        spec = make_spec(accel, extra_args=("-object", "bogus"))
        with pytest.raises(PlatformError, match=r"^source: QEMU failed to start \(status 1\); "
                                                r"QEMU said: .*-object bogus: "):
            run(QemuMachine.launch(spec, workdir, binary))

    def test_the_machine_boots_its_own_copy_of_the_image(self, binary, workdir, tmp_path):
        """The boot image is copied into the workdir and QEMU opens the copy."""
        image = tmp_path / "boot.img"
        image.write_bytes(b"\xf4" * 512)

        async def body() -> None:
            spec = make_spec(TCG, paused=True, boot_image=image)
            async with started(spec, workdir, binary) as machine:
                copy = workdir / "source.img"
                assert copy.read_bytes() == image.read_bytes()
                open_files = {os.readlink(fd) for fd in Path(f"/proc/{machine.pid}/fd").iterdir()}
                assert str(copy) in open_files
                assert str(image) not in open_files
        run(body())

    def test_a_stale_ram_file_does_not_leak_into_the_new_guest(self, binary, accel, workdir):
        """Memory left by an earlier machine of the same name is not the new guest's."""
        (workdir / "source.ram").write_bytes(b"stale" * 1000)

        async def body() -> bytes:
            async with started(make_spec(accel, paused=True), workdir, binary) as machine:
                with machine.map_ram() as ram:
                    return ram[:5000]
        assert run(body()) == bytes(5000)

    def test_a_workdir_too_long_for_a_socket_is_refused(self, binary, accel, workdir):
        """A QMP socket path longer than a UNIX address can hold is refused up front."""
        deep = workdir / ("d" * 100)
        with pytest.raises(PlatformError, match="too long a path for a UNIX socket"):
            run(QemuMachine.launch(make_spec(accel), deep, binary))


class TestExecute:
    def test_an_unknown_command_names_the_command(self, binary, accel, workdir):
        """A command QEMU does not know raises PlatformError naming it."""
        async def body() -> None:
            async with started(make_spec(accel), workdir, binary) as machine:
                with pytest.raises(PlatformError, match=r"^source: QMP no-such-command failed: "):
                    await machine.execute("no-such-command")
                assert await machine.status() == "running"
        run(body())

    def test_stop_and_cont_change_the_run_state(self, binary, accel, workdir):
        """stop pauses the vCPUs and cont resumes them."""
        async def body() -> list[str]:
            async with started(make_spec(accel), workdir, binary) as machine:
                await machine.stop()
                paused = await machine.status()
                await machine.cont()
                return [paused, await machine.status()]
        assert run(body()) == ["paused", "running"]

    def test_a_killed_qemu_is_reported_as_exited(self, binary, accel, workdir):
        """After QEMU is SIGKILLed, the next command says it exited, and how."""
        async def body() -> None:
            async with started(make_spec(accel), workdir, binary) as machine:
                os.kill(machine.pid, signal.SIGKILL)
                with pytest.raises(PlatformError,
                                   match=r"^source: QEMU exited \(killed by SIGKILL\)"):
                    await machine.execute("query-status")
                assert machine.exited
                assert machine.returncode == -signal.SIGKILL
        run(body())

    def test_a_tcg_machine_does_not_use_kvm(self, binary, workdir):
        """A machine asked to use TCG really runs without KVM."""
        async def body() -> Any:
            async with started(make_spec(TCG), workdir, binary) as machine:
                return await machine.execute("query-kvm")
        assert run(body())["enabled"] is False

    def test_the_machine_uses_the_chosen_accelerator(self, binary, accel, workdir):
        """A machine runs on the accelerator in its spec."""
        async def body() -> Any:
            async with started(make_spec(accel), workdir, binary) as machine:
                return await machine.execute("query-kvm")
        assert run(body())["enabled"] is (accel.name == "kvm")


class TestEvents:
    def test_an_event_is_received_by_a_listener_registered_before(self, binary, accel, workdir):
        """A listener entered before stop receives the STOP event."""
        async def body() -> dict[str, Any]:
            async with started(make_spec(accel), workdir, binary) as machine:
                with machine.listen("STOP") as events:
                    await machine.stop()
                    return await machine.wait_for_event(events, "STOP", timeout=10)
        assert run(body())["event"] == "STOP"

    def test_events_that_do_not_match_are_skipped(self, binary, accel, workdir):
        """Waiting for RESUME passes over the STOP before it."""
        async def body() -> list[str]:
            async with started(make_spec(accel), workdir, binary) as machine:
                with machine.listen("STOP", "RESUME") as events:
                    await machine.stop()
                    await machine.cont()
                    await machine.wait_for_event(events, "RESUME", timeout=10)
                    return [event["event"] for event in events.history]
        assert run(body()) == ["STOP", "RESUME"]

    def test_an_event_sent_just_before_qemu_exits_is_not_lost(self, binary, accel, workdir):
        """The SHUTDOWN event of a quitting QEMU is returned, matched on its data."""
        async def body() -> dict[str, Any]:
            async with started(make_spec(accel), workdir, binary) as machine:
                with machine.listen("SHUTDOWN") as events:
                    await machine.execute("quit")
                    return await machine.wait_for_event(
                        events, "SHUTDOWN", timeout=10, match={"reason": "host-qmp-quit"})
        assert run(body())["data"]["reason"] == "host-qmp-quit"

    def test_waiting_in_vain_times_out(self, binary, accel, workdir):
        """An event that never comes fails the wait after the timeout, naming the event."""
        async def body() -> None:
            async with started(make_spec(accel), workdir, binary) as machine:
                with machine.listen("STOP") as events, pytest.raises(
                    PlatformError, match=r"^source: no STOP event within 0\.2 s"
                ):
                    await machine.wait_for_event(events, "STOP", timeout=0.2)
        run(body())

    def test_waiting_ends_when_qemu_dies(self, binary, accel, workdir):
        """A wait for an event fails at once when QEMU dies, not at its timeout."""
        async def body() -> None:
            async with started(make_spec(accel), workdir, binary) as machine:
                with machine.listen("MIGRATION") as events:
                    os.kill(machine.pid, signal.SIGKILL)
                    with pytest.raises(PlatformError, match=r"QEMU exited \(killed by SIGKILL\) "
                                                            r"during the wait for MIGRATION"):
                        await asyncio.wait_for(
                            machine.wait_for_event(events, "MIGRATION", timeout=60), 20)
        run(body())


class TestShutdown:
    def test_shutdown_quits_qemu_and_can_be_repeated(self, binary, accel, workdir):
        """shutdown makes QEMU quit cleanly, removes the RAM file, and is idempotent."""
        async def body() -> QemuMachine:
            machine = await QemuMachine.launch(make_spec(accel), workdir, binary)
            await machine.shutdown()
            await machine.shutdown()
            return machine
        machine = run(body())
        assert machine.returncode == 0
        assert not machine.ram_path.exists()
        assert machine.log_path.exists()

    def test_shutdown_of_a_dead_machine_does_not_raise(self, binary, accel, workdir):
        """A machine whose QEMU was killed shuts down quietly."""
        async def body() -> int | None:
            machine = await QemuMachine.launch(make_spec(accel), workdir, binary)
            machine.kill()
            machine.kill()
            await machine.shutdown()
            return machine.returncode
        assert run(body()) == -signal.SIGKILL

    def test_a_qemu_that_does_not_quit_is_killed(self, binary, accel, workdir):
        """A QEMU that ignores quit (here: stopped by SIGSTOP) is killed after the timeout."""
        async def body() -> int | None:
            machine = await QemuMachine.launch(make_spec(accel), workdir, binary)
            os.kill(machine.pid, signal.SIGSTOP)
            await machine.shutdown(timeout=0.5)
            return machine.returncode
        assert run(body()) == -signal.SIGKILL

    def test_wait_exited_returns_none_while_qemu_runs(self, binary, accel, workdir):
        """wait_exited gives up after its timeout when QEMU keeps running."""
        async def body() -> int | None:
            async with started(make_spec(accel), workdir, binary) as machine:
                return await machine.wait_exited(0.1)
        assert run(body()) is None


class TestMapRam:
    def test_the_mapping_covers_all_guest_ram_read_only(self, binary, accel, workdir):
        """map_ram maps exactly memory_mib MiB, and refuses writes."""
        async def body() -> None:
            async with started(make_spec(accel, paused=True), workdir, binary) as machine:
                with machine.map_ram() as ram:
                    assert len(ram) == 32 * MiB
                    with pytest.raises(TypeError):
                        ram[0] = 1
        run(body())

    def test_the_mapping_is_guest_physical_memory(self, binary, accel, workdir):
        """Bytes in the RAM file are what the guest has at that physical address."""
        async def body() -> tuple[bytes, bytes]:
            async with started(make_spec(accel, paused=True), workdir, binary) as machine:
                pattern = os.urandom(4096)
                with machine.ram_path.open("r+b") as ram_file:
                    ram_file.seek(MiB)
                    ram_file.write(pattern)
                dump = workdir / "dump"
                await machine.execute("pmemsave",
                                      {"val": MiB, "size": 4096, "filename": str(dump)})
                with machine.map_ram() as ram:
                    assert ram[MiB:MiB + 4096] == pattern
                return pattern, dump.read_bytes()
        pattern, seen_by_qemu = run(body())
        assert seen_by_qemu == pattern


class TestFleet:
    def test_everything_is_cleaned_up_on_a_normal_exit(self, accel, binary):
        """Leaving the block ends every machine and removes the work directory."""
        async def body() -> tuple[Path, list[QemuMachine]]:
            async with Fleet() as fleet:
                source = await launch(fleet, make_spec(accel, "source"), binary)
                target = await launch(fleet, make_spec(accel, "target", incoming="defer"), binary)
                assert fleet.machines == (source, target)
                assert fleet.workdir.exists()
            return fleet.workdir, [source, target]
        workdir, machines = run(body())
        assert all(machine.returncode == 0 for machine in machines)
        assert not any(Path(f"/proc/{machine.pid}").exists() for machine in machines)
        assert not workdir.exists()

    @pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
    def test_everything_is_cleaned_up_when_the_body_raises(self, accel, binary, error):
        """An exception in the block still ends every machine and removes the work directory."""
        seen: dict[str, Any] = {}

        async def body() -> None:
            async with Fleet() as fleet:
                seen["workdir"] = fleet.workdir
                seen["machines"] = [await launch(fleet, make_spec(accel, name), binary)
                                    for name in ("source", "target")]
                raise error
        with pytest.raises(type(error)):
            run(body())
        assert all(machine.exited for machine in seen["machines"])
        assert not seen["workdir"].exists()

    def test_everything_is_cleaned_up_when_the_task_is_cancelled(self, accel, binary):
        """Cancelling the task inside the block still ends every machine."""
        seen: dict[str, Any] = {}

        async def body() -> None:
            launched = asyncio.Event()

            async def migration() -> None:
                async with Fleet() as fleet:
                    seen["workdir"] = fleet.workdir
                    seen["machine"] = await launch(fleet, make_spec(accel), binary)
                    launched.set()
                    await asyncio.Event().wait()

            task = asyncio.create_task(migration())
            await launched.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        run(body())
        assert seen["machine"].exited
        assert not seen["workdir"].exists()

    def test_keep_workdir_keeps_logs_but_not_processes(self, accel, binary):
        """keep_workdir leaves the files for inspection; the machines still end."""
        async def body() -> tuple[Path, QemuMachine]:
            async with Fleet(keep_workdir=True) as fleet:
                machine = await launch(fleet, make_spec(accel), binary)
            return fleet.workdir, machine
        workdir, machine = run(body())
        try:
            assert machine.exited
            assert (workdir / "source.log").exists()
        finally:
            shutil.rmtree(workdir)

    def test_a_given_workdir_is_not_removed(self, accel, binary, workdir):
        """A work directory passed in belongs to the caller and stays."""
        async def body() -> None:
            async with Fleet(workdir=workdir) as fleet:
                await launch(fleet, make_spec(accel), binary)
        run(body())
        assert (workdir / "source.log").exists()

    def test_two_live_machines_cannot_share_a_name(self, accel, binary):
        """A second live machine with the same name would share files, so it is refused."""
        async def body() -> None:
            async with Fleet() as fleet:
                await launch(fleet, make_spec(accel), binary)
                with pytest.raises(PlatformError, match=r"^source: a machine of that name"):
                    await launch(fleet, make_spec(accel), binary)
        run(body())

    def test_a_detached_machine_keeps_running(self, accel, binary):
        """A detached machine survives the fleet, which keeps the work directory for it."""
        async def body() -> tuple[Path, str]:
            async with Fleet() as fleet:
                machine = await launch(fleet, make_spec(accel, die_with_parent=False), binary)
                fleet.detach(machine)
                assert fleet.machines == ()
            try:
                return fleet.workdir, await machine.status()
            finally:
                await machine.shutdown()
        workdir, status = run(body())
        try:
            assert status == "running"
            assert (workdir / "source.log").exists()
        finally:
            shutil.rmtree(workdir)

    def test_a_machine_bound_to_vmmig_cannot_be_detached(self, accel, binary):
        """Detaching a machine that dies with vmmig is refused: it could not keep running."""
        async def body() -> None:
            async with Fleet() as fleet:
                machine = await launch(fleet, make_spec(accel), binary)
                with pytest.raises(PlatformError, match="die_with_parent=False"):
                    fleet.detach(machine)
                assert fleet.machines == (machine,)
        run(body())


SCRIPT = """
import asyncio, sys
from vmmig.platforms.fleet import Fleet
from vmmig.platforms.qemu import Accel, QemuMachine, QemuMachineSpec, find_qemu

async def main(die_with_parent: bool, hang: bool) -> None:
    fleet = Fleet()
    await fleet.__aenter__()  # never left: only the atexit hook or PDEATHSIG can clean up
    spec = QemuMachineSpec(name="source", memory_mib=32, accel=Accel("tcg", "test"),
                           die_with_parent=die_with_parent)
    machine = await fleet.launch(
        "source", lambda workdir: QemuMachine.launch(spec, workdir, find_qemu()))
    print(machine.pid, fleet.workdir, flush=True)
    if hang:
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1] == "die-with-parent", sys.argv[2] == "hang"))
"""


def start_vmmig(*args: str) -> tuple[subprocess.Popen[str], int, Path]:
    """Run a vmmig process that launches one machine; return it, QEMU's pid, the workdir."""
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert process.stdout is not None
    with process.stdout:
        pid, workdir = process.stdout.readline().split()
    return process, int(pid), Path(workdir)


class TestVmmigDeath:
    @pytest.mark.timeout(60)
    def test_qemu_dies_when_vmmig_is_sigkilled(self):
        """SIGKILL of vmmig, which runs no cleanup at all, still ends its QEMU."""
        process, pid, workdir = start_vmmig("die-with-parent", "hang")
        try:
            process.kill()
            process.wait(10)
            assert process_gone(pid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    @pytest.mark.timeout(60)
    def test_the_atexit_hook_cleans_up_a_fleet_never_left(self):
        """A vmmig that exits without leaving its fleet still kills QEMU and removes the files."""
        process, pid, workdir = start_vmmig("outlive", "exit")
        try:
            assert process.wait(10) == 0
            assert process_gone(pid)
            assert not workdir.exists()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(workdir, ignore_errors=True)
