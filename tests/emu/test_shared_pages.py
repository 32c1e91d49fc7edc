"""Guest-shared pages: KVM_HC_MAP_GPA_RANGE on emulated SEV machines, seen by guest and host.

A tiny guest shares one page with ``vmmcall``, writes a known value there and a
canary into a private page, tries the hypercall with bad arguments, waits for
the host to write into the shared page, copies what it finds, makes the page
private again and halts.  In-process machines let the tests read the guest's
own results (``machine.memory.ram``); the host's view is QMP and the shared
file, as an agent has it.
"""

from __future__ import annotations

import base64
import mmap
import queue

import numpy as np
import pytest
from psp_support import make_psp
from sev_support import MEMORY, Owner, qmp

from vmmig.guests.build import build_from_source
from vmmig.guests.emu import PROGRAM_GPA, load_image
from vmmig.platforms.emu.machine import Machine, MachineConfig
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.shared_pages import ATTRIBUTES_EVENT, KVM_EINVAL
from vmmig.platforms.emu.vcpu import KVM_ENOSYS, VMMCALL, Vcpu, VcpuState


PAGE = 4096
SHARED, PRIVATE, RESULTS = 0x200000, 0x300000, 0x400000
FLAG = SHARED + 0x100
SHARED_VALUE = b"shared-plaintext"
CANARY = b"private-canary!!"
HOST_VALUE = b"host-wrote-this!"
PRIVATE_AGAIN = b"private-again!!!"
TIMEOUT = 30.0


def _u64s(data: bytes) -> tuple[int, int]:
    return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")


def _store16(data: bytes, where: int) -> str:
    low, high = _u64s(data)
    return (f"        movabs ${low:#x}, %rax\n        mov %rax, {where:#x}\n"
            f"        movabs ${high:#x}, %rax\n        mov %rax, {where + 8:#x}\n")


#: (hypercall number, gpa, pages, attributes) per result slot, and the answer on SEV.
CALLS = [
    ((12, SHARED, 1, 0), 0),                       # share one page
    ((12, SHARED + 8, 1, 0), -KVM_EINVAL),         # unaligned
    ((12, MEMORY, 1, 0), -KVM_EINVAL),             # beyond RAM
    ((12, MEMORY - PAGE, 2, 0), -KVM_EINVAL),      # straddles the end of RAM
    ((12, SHARED, 1, 0x20), -KVM_EINVAL),          # unknown attribute bit
    ((12, SHARED, 0, 0), -KVM_EINVAL),             # no pages
    ((99, SHARED, 1, 0), -KVM_ENOSYS),             # unknown hypercall
    ((12, SHARED, 1, 3), -KVM_EINVAL),             # page size hint above 1 GiB
]
BACK_TO_PRIVATE = len(CALLS)  # the result slot of the last call


def _hypercall(call: tuple[int, int, int, int], slot: int) -> str:
    number, gpa, pages, attributes = call
    return (f"        mov ${number}, %eax\n        mov ${gpa:#x}, %rbx\n"
            f"        mov ${pages}, %rcx\n        mov ${attributes:#x}, %rdx\n"
            f"        vmmcall\n        mov %rax, {RESULTS + 8 * slot:#x}\n")


def _program() -> str:
    calls = "".join(_hypercall(call, slot) for slot, (call, _) in enumerate(CALLS))
    return f"""
        .code64
        .globl _start
_start:
{_hypercall(CALLS[0][0], 0)}
{_store16(SHARED_VALUE, SHARED)}
{_store16(CANARY, PRIVATE)}
{calls}
        mov $'R', %al
        mov $0x3f8, %dx
        out %al, (%dx)
1:      mov {FLAG:#x}, %rax
        test %rax, %rax
        jnz 2f
        mov $100, %eax
        mov $0xe0, %dx
        out %eax, (%dx)
        jmp 1b
2:      mov {FLAG:#x}, %rax
        mov %rax, {RESULTS + 0x80:#x}
        mov {FLAG + 8:#x}, %rax
        mov %rax, {RESULTS + 0x88:#x}
{_hypercall((12, SHARED, 1, 0x10), BACK_TO_PRIVATE)}
        mov {SHARED:#x}, %rax
        mov %rax, {RESULTS + 0x90:#x}
        mov {SHARED + 8:#x}, %rax
        mov %rax, {RESULTS + 0x98:#x}
{_store16(PRIVATE_AGAIN, SHARED)}
        mov $'D', %al
        mov $0x3f8, %dx
        out %al, (%dx)
        hlt
"""


@pytest.fixture(scope="module")
def image(cache) -> bytes:
    return build_from_source(_program().encode(), stem="shared-pages", cache_dir=cache,
                             flat64_base=PROGRAM_GPA).read_bytes()


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    hosts = tmp_path_factory.mktemp("shared-hosts")
    return hosts / "host-a", make_psp(hosts, "host-a")


@pytest.fixture
def machine(request, tmp_path, host, image):
    """A running machine of the parametrised technology with the test guest in vCPU 0.

    The guest replaces the measured idle image after the launch, as a guest
    loads its own code; events land in ``machine.events``.
    """
    tech = request.param
    if tech == "plain":
        config = MachineConfig(name="vm", memory=MEMORY, run_dir=tmp_path, workload="idle")
    else:
        config = Owner(host[1], tech).config(host[0], tmp_path, workload="idle")
    made = Machine(config)
    try:
        made.vcpus[0].load_vmsa(load_image(made.memory.ram, image).vmsa)
        made.events = queue.Queue()
        made.on_event = lambda event, data: made.events.put((event, data))
        yield made
    finally:
        made.close()


def _results(machine: Machine, slots: int) -> list[int]:
    raw = machine.memory.ram[RESULTS:RESULTS + 8 * slots]
    return [int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, len(raw), 8)]


def _host_read(machine: Machine, gpa: int, size: int) -> bytes:
    return base64.b64decode(qmp(machine, "x-memory-read", gpa=gpa, size=size)["data"])


def _attribute_events(machine: Machine) -> list[object]:
    """The X_MEMORY_ATTRIBUTES events not yet seen: all are sent before their hypercall returns."""
    found = []
    while not machine.events.empty():
        event, data = machine.events.get_nowait()
        if event == ATTRIBUTES_EVENT:
            found.append(data)
    return found


def _run_to_host_flag(machine: Machine) -> None:
    qmp(machine, "cont")
    assert machine.console.wait_for("R", 1, TIMEOUT), machine.vcpus[0].detail


def _set_host_flag_and_finish(machine: Machine) -> None:
    qmp(machine, "x-memory-write", gpa=FLAG, data=base64.b64encode(HOST_VALUE).decode())
    assert machine.vcpus[0].wait(TIMEOUT) is VcpuState.HALTED, machine.vcpus[0].detail
    assert machine.console.text == "RD"


@pytest.mark.parametrize("machine", ["sev"], indirect=True)
class TestSevGuestSharesAPage:
    def test_the_shared_page_is_plaintext_to_the_host_and_the_private_one_is_not(
            self, machine):
        """Hypercall 0, range shared, an event; the host reads the guest's value in the
        shared file and over QMP, while the canary stays ciphertext and out of the file."""
        memory = qmp(machine, "x-query-memory")
        assert memory["shared"] == []
        with open(memory["shared-path"], "r+b") as stream, \
                mmap.mmap(stream.fileno(), MEMORY) as shared_file:
            _run_to_host_flag(machine)
            assert _results(machine, len(CALLS)) == [answer for _, answer in CALLS]
            # One event: the refused calls changed nothing.
            assert _attribute_events(machine) == [{"gpa": SHARED, "pages": 1, "shared": True}]
            assert qmp(machine, "x-query-shared") == [{"gpa": SHARED, "pages": 1}]
            assert qmp(machine, "x-query-memory")["shared"] == [{"gpa": SHARED, "pages": 1}]

            assert shared_file[SHARED:SHARED + 16] == SHARED_VALUE
            assert _host_read(machine, SHARED, 16) == SHARED_VALUE
            assert machine.memory.ram[PRIVATE:PRIVATE + 16] == CANARY
            assert _host_read(machine, PRIVATE, 16) != CANARY
            assert shared_file.find(CANARY) == -1
            # Across the boundary: the private page's end sealed, the shared page's plain.
            both = _host_read(machine, SHARED - 16, 32)
            assert both[16:] == SHARED_VALUE
            assert both[:16] != machine.memory.ram[SHARED - 16:SHARED]

    def test_a_host_write_reaches_the_guest_and_converting_back_hides_the_page(self, machine):
        """The guest reads the host's bytes as written; back to private, the page is zeroed,
        the file keeps no copy, and what the guest writes there is ciphertext to the host."""
        memory = qmp(machine, "x-query-memory")
        with open(memory["shared-path"], "r+b") as stream, \
                mmap.mmap(stream.fileno(), MEMORY) as shared_file:
            _run_to_host_flag(machine)
            assert len(_attribute_events(machine)) == 1
            _set_host_flag_and_finish(machine)
            assert machine.memory.ram[RESULTS + 0x80:RESULTS + 0x90] == HOST_VALUE
            assert _results(machine, BACK_TO_PRIVATE + 1)[BACK_TO_PRIVATE] == 0
            assert _attribute_events(machine) == [{"gpa": SHARED, "pages": 1, "shared": False}]
            assert qmp(machine, "x-query-shared") == []
            assert machine.memory.ram[RESULTS + 0x90:RESULTS + 0xA0] == bytes(16)
            assert shared_file[SHARED:SHARED + PAGE] == bytes(PAGE)
            assert machine.memory.ram[SHARED:SHARED + 16] == PRIVATE_AGAIN
            assert _host_read(machine, SHARED, 16) != PRIVATE_AGAIN
            assert shared_file.find(PRIVATE_AGAIN) == -1

    def test_the_dirty_log_follows_a_conversion(self, machine):
        """Started before the guest shares, the log still syncs and reports the page."""
        qmp(machine, "x-dirty-log-start")
        _run_to_host_flag(machine)
        dirty = qmp(machine, "x-dirty-log-sync")["dirty"]
        with open(qmp(machine, "x-query-memory")["dirty-pages-path"], "rb") as stream:
            pages = np.frombuffer(stream.read(8 * dirty), dtype="<u8").tolist()
        assert {SHARED // PAGE, PRIVATE // PAGE} <= set(pages)
        _set_host_flag_and_finish(machine)
        qmp(machine, "x-dirty-log-sync")
        qmp(machine, "x-dirty-log-stop")


@pytest.mark.parametrize("machine", ["plain"], indirect=True)
def test_a_plain_machine_has_no_hypercall_and_no_shared_segment(machine):
    """KVM's answer when the VMM did not take the hypercall: -KVM_ENOSYS; RAM stays put."""
    assert qmp(machine, "x-query-memory")["shared-path"] is None
    _run_to_host_flag(machine)
    assert _results(machine, len(CALLS)) == [-KVM_ENOSYS] * len(CALLS)
    _set_host_flag_and_finish(machine)
    assert _attribute_events(machine) == []
    assert qmp(machine, "x-query-shared") == []
    # Plain RAM never changed backing: the guest reads back what it wrote.
    assert machine.memory.ram[RESULTS + 0x90:RESULTS + 0xA0] == SHARED_VALUE


class TestVcpuHypercall:
    def test_arguments_result_and_the_instruction_after(self):
        """RAX number, RBX..RSI arguments, the result in RAX, execution continues."""
        calls = []
        # mov $7,%eax; mov $1,%ebx; mov $2,%ecx; mov $3,%edx; mov $4,%esi; vmmcall; hlt
        code = (b"\xb8\x07\x00\x00\x00\xbb\x01\x00\x00\x00\xb9\x02\x00\x00\x00"
                b"\xba\x03\x00\x00\x00\xbe\x04\x00\x00\x00" + VMMCALL + b"\xf4")
        with mmap.mmap(-1, 2 << 20) as ram, \
                Vcpu(0, ram, on_hypercall=lambda n, a: calls.append((n, a)) or -5) as cpu:
            cpu.load_vmsa(load_image(ram, code).vmsa)
            cpu.run_thread()
            assert cpu.wait(TIMEOUT) is VcpuState.HALTED, cpu.detail
            assert calls == [(7, (1, 2, 3, 4))]
            assert cpu.vmsa.rax == (1 << 64) - 5
            assert cpu.vmsa.rip == PROGRAM_GPA + len(code)

    def test_without_a_handler_enosys_and_a_failing_handler_crashes(self):
        with mmap.mmap(-1, 2 << 20) as ram:
            entry = load_image(ram, VMMCALL + b"\xf4")
            with Vcpu(0, ram) as cpu:
                cpu.load_vmsa(entry.vmsa)
                cpu.run_thread()
                assert cpu.wait(TIMEOUT) is VcpuState.HALTED
                assert cpu.vmsa.rax == (1 << 64) - KVM_ENOSYS

            def fail(_number, _args):
                raise RuntimeError("boom")

            with Vcpu(1, ram, on_hypercall=fail) as cpu:
                cpu.load_vmsa(entry.vmsa)
                cpu.run_thread()
                assert cpu.wait(TIMEOUT) is VcpuState.CRASHED
                assert "handler failed" in cpu.detail
                assert "boom" in cpu.detail


def test_a_host_write_across_shared_and_private_pages(tmp_path):
    """Plain bytes in the shared page, ciphertext taken in the private one (its blocks garbled)."""
    memory = GuestMemory(4 * PAGE, private=True, shared_path=tmp_path / "vm.shared")
    try:
        memory.load_key(bytes(range(32)))
        memory.convert(1, 1, shared=True)
        memory.host_write(PAGE - 16, b"A" * 32)
        assert memory.ram[PAGE:PAGE + 16] == b"A" * 16
        assert memory.ram[PAGE - 16:PAGE] not in (b"A" * 16, bytes(16))
        assert memory.host_read(PAGE - 16, 32) == b"A" * 32
        assert memory.shared_runs() == [(1, 1)]
    finally:
        memory.close()
    assert not (tmp_path / "vm.shared").exists()
