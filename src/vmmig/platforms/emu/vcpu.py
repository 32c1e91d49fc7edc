"""vCPUs of the emulated platform: real x86-64 guest code in Unicorn, one thread each.

A :class:`Vcpu` wraps one Unicorn engine in 64-bit mode whose memory *is* the
machine's RAM mapping (``mem_map_ptr``): guest stores land in the shared
pages, where the kernel's dirty log sees them.  Its registers move to and
from a :class:`~vmmig.platforms.emu.vmsa.Vmsa`, AMD's save-area layout.

Execution.  :meth:`Vcpu.run_thread` starts a thread that runs the guest in
slices of :data:`SLICE` instructions (``emu_start`` with a count) and
between two slices obeys pause and stop requests, so a paused vCPU always
stands between two instructions with its registers exact.  Unicorn's
asynchronous ``emu_stop`` would answer faster but is not exact: measured on
Unicorn 2.1.4, a stop from another thread leaves RIP at the start of an
earlier translation block while memory and the other registers have moved
on, so the guest re-executes instructions when resumed (the a-b guest
breaks its rule within a few stops).  The instruction count Unicorn then
keeps costs 25 % on memory-bound code and up to 3x on register-only code;
a slice takes 1-5 ms, which bounds the pause latency.  Unicorn releases the
GIL while it runs, so vCPUs of one process run in parallel.

Exits.  HLT ends the vCPU (``halted``): the guests run with interrupts off,
so nothing would wake it.  Unicorn ends a slice early at HLT without saying
so; the vCPU takes a slice that ends just after an 0xf4 byte as a HLT (code
is assumed identity-mapped there), which a slice that ran out of count
right after an instruction whose last byte is 0xf4 would imitate: the
shipped programs are checked to have none.  A CPU exception, an access
outside the guest's RAM, an invalid instruction or a failing port handler
ends it ``crashed``, with the reason and address in :attr:`Vcpu.detail`;
nothing reaches stderr.

Ports.  ``out`` is the guests' hypercall: every port write goes to the
``on_port_write`` callback (COM1 at 0x3f8 is the serial console), except
:data:`IDLE_PORT`, which the vCPU handles itself: the value is a number of
microseconds the guest has nothing to do, and its thread waits that long
(at most :data:`MAX_IDLE_US`, and no longer than until the next pause or
stop) instead of spinning, as a real vCPU would sit in HLT until its timer.
These hooks fire on ``out``, exceptions and bad accesses only, never on
ordinary instructions.

Hypercalls.  ``vmmcall`` (0F 01 D9, AMD's) is KVM's hypercall: number in
RAX, arguments in RBX, RCX, RDX and RSI, result in RAX.  Unicorn has no
instruction hook for it: it raises #UD, which Unicorn reports as an invalid
instruction (not through the interrupt hook); the vCPU's invalid-instruction
hook recognises the bytes at RIP (code assumed identity-mapped, as for
HLT), calls ``on_hypercall`` in the vCPU's thread, puts the result in RAX,
steps over the instruction and continues in the same slice.  Without a
handler every hypercall answers ``-KVM_ENOSYS`` (-1000), as KVM answers an
unknown one.  SEV-ES guests would use the GHCB instead; here they use
``vmmcall`` too.

CPUID.  The vCPU answers the hypervisor leaves from :data:`CPUID_HV_BASE`
to :data:`CPUID_HV_TIMING` itself, as VMware and KVM do: the base leaf
gives the highest of them and a vendor id (:data:`CPUID_HV_VENDOR`), the
timing leaf the TSC's rate in kHz (EAX; the APIC's, EBX, is 0: there is
none), and the others read as zeros.  So a guest learns its clock's rate at
run time rather than from its launch image, which must not depend on the
host it is measured on.  Every other leaf is Unicorn's.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import mmap
import struct
import threading
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final

import attrs
from unicorn import x86_const as x86
from unicorn.unicorn_const import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_MEM_INVALID,
    UC_MEM_FETCH_PROT,
    UC_MEM_FETCH_UNMAPPED,
    UC_MEM_READ_PROT,
    UC_MEM_READ_UNMAPPED,
    UC_MODE_64,
    UC_PROT_ALL,
)

# The package root re-exports these through a Python 2/3 switch that mypy
# reads as untyped; unicorn_py3 is the typed implementation behind it.
from unicorn.unicorn_py3 import Uc, UcError

from vmmig.errors import PlatformError
from vmmig.platforms.emu.vmsa import XMM_COUNT, Segment, Vmsa


__all__ = ["CPUID_HV_BASE", "CPUID_HV_TIMING", "CPUID_HV_VENDOR", "IDLE_PORT", "KVM_ENOSYS",
           "MAX_IDLE_US", "MAX_THROTTLE", "SLICE", "VMMCALL", "HypercallHandler",
           "PortWriteHandler", "Vcpu", "VcpuState", "tsc_hz"]

#: ``on_port_write(port, size, value)``: a guest ``out`` of ``size`` bytes.
PortWriteHandler = Callable[[int, int, int], None]
#: ``on_hypercall(number, (a0, a1, a2, a3))`` -> the result for RAX (negative: -errno).
HypercallHandler = Callable[[int, tuple[int, int, int, int]], int]

#: AMD's hypercall instruction.
VMMCALL: Final = b"\x0f\x01\xd9"
#: KVM's "no such hypercall" (include/uapi/linux/kvm_para.h); RAX gets its negation.
KVM_ENOSYS: Final = 1000

#: CPUID's hypervisor base leaf: the highest hypervisor leaf and the vendor id.
CPUID_HV_BASE: Final = 0x4000_0000
#: The timing leaf (VMware's, which KVM adopted): TSC kHz in EAX, APIC kHz in EBX.
CPUID_HV_TIMING: Final = 0x4000_0010
#: The vendor id the base leaf gives in EBX, ECX and EDX.
CPUID_HV_VENDOR: Final = b"VmmigEmuVcpu"

#: Port whose 32-bit ``out`` value is a number of microseconds to idle.
IDLE_PORT: Final = 0xE0
#: The longest idle one ``out`` to :data:`IDLE_PORT` buys.
MAX_IDLE_US: Final = 10_000
#: Instructions per ``emu_start``: 1-5 ms of guest time, the pause latency.
SLICE: Final = 100_000
#: The deepest throttle, as QEMU's ``max-cpu-throttle`` default.
MAX_THROTTLE: Final = 99

PAGE_SIZE: Final = 4096
_HLT = 0xF4
#: ``emu_start``'s end address: a non-canonical one, which code can never reach.
_NEVER = (1 << 64) - 1
_EFER = 0xC000_0080

#: VMSA fields that are one plain Unicorn register each.
_PLAIN: Final[Mapping[str, int]] = MappingProxyType({
    "rax": x86.UC_X86_REG_RAX,
    "rbx": x86.UC_X86_REG_RBX,
    "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX,
    "rsi": x86.UC_X86_REG_RSI,
    "rdi": x86.UC_X86_REG_RDI,
    "rbp": x86.UC_X86_REG_RBP,
    "rsp": x86.UC_X86_REG_RSP,
    "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9,
    "r10": x86.UC_X86_REG_R10,
    "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12,
    "r13": x86.UC_X86_REG_R13,
    "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
    "rip": x86.UC_X86_REG_RIP,
    "rflags": x86.UC_X86_REG_RFLAGS,
    "cr2": x86.UC_X86_REG_CR2,
    "dr6": x86.UC_X86_REG_DR6,
    "dr7": x86.UC_X86_REG_DR7,
    "mxcsr": x86.UC_X86_REG_MXCSR,
})
#: Segment registers whose selector alone Unicorn lets us set in 64-bit mode.
_SELECTORS: Final[Mapping[str, int]] = MappingProxyType({
    "es": x86.UC_X86_REG_ES,
    "cs": x86.UC_X86_REG_CS,
    "ss": x86.UC_X86_REG_SS,
    "ds": x86.UC_X86_REG_DS,
})
#: FS and GS: a selector write loads the descriptor; the base is separate.
_FS_GS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType({
    "fs": (x86.UC_X86_REG_FS, x86.UC_X86_REG_FS_BASE),
    "gs": (x86.UC_X86_REG_GS, x86.UC_X86_REG_GS_BASE),
})
#: Descriptor-table registers (base and limit; LDTR and TR also selector and attributes).
_TABLES: Final[Mapping[str, int]] = MappingProxyType({
    "gdtr": x86.UC_X86_REG_GDTR,
    "idtr": x86.UC_X86_REG_IDTR,
    "ldtr": x86.UC_X86_REG_LDTR,
    "tr": x86.UC_X86_REG_TR,
})
_XMM = tuple(x86.UC_X86_REG_XMM0 + i for i in range(XMM_COUNT))
#: Where CPUID puts its answer.
_CPUID_OUT = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX)

_VECTORS = {0: "#DE", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
            10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC",
            18: "#MC", 19: "#XM"}


class VcpuState(enum.Enum):
    """Where a vCPU is in its life."""

    #: Not executing (never started, or paused); its registers can be read and set.
    PAUSED = "paused"
    #: Executing guest code in its thread.
    RUNNING = "running"
    #: The guest executed HLT; the vCPU is done.
    HALTED = "halted"
    #: The guest faulted, or a port handler failed; :attr:`Vcpu.detail` says how.
    CRASHED = "crashed"
    #: Ended by :meth:`Vcpu.stop`.
    STOPPED = "stopped"


class Vcpu:
    """One x86-64 vCPU executing in Unicorn over a machine's RAM.

    :param index: the vCPU's number, for names and messages.
    :param ram: the guest RAM; it stays mapped (``close`` refuses) until :meth:`stop`.
    :param ram_base_gpa: the guest-physical address of the RAM's first byte.
    :param on_port_write: called in the vCPU's thread for each ``out`` the
        vCPU does not handle itself; an exception it raises crashes the vCPU.
    :param on_hypercall: called in the vCPU's thread for each ``vmmcall``;
        an exception it raises crashes the vCPU.
    :raises ValueError: the RAM or its base is not whole pages.
    """

    def __init__(self, index: int, ram: mmap.mmap, ram_base_gpa: int = 0, *,
                 on_port_write: PortWriteHandler | None = None,
                 on_hypercall: HypercallHandler | None = None) -> None:
        if not len(ram) or len(ram) % PAGE_SIZE or ram_base_gpa % PAGE_SIZE:
            raise ValueError(f"vCPU RAM must be whole pages at a page boundary, not "
                             f"{len(ram)} bytes at {ram_base_gpa:#x}")
        self.index = index
        self._on_port_write = on_port_write
        self._on_hypercall = on_hypercall
        self._uc = Uc(UC_ARCH_X86, UC_MODE_64)
        # A ctypes view exports the mmap's buffer: while it lives, mmap.close()
        # raises instead of unmapping memory Unicorn still writes to.
        self._pin: ctypes.c_char | None = ctypes.c_char.from_buffer(ram)
        self._span = (ram_base_gpa, len(ram))
        self._uc.mem_map_ptr(ram_base_gpa, len(ram), UC_PROT_ALL, ctypes.addressof(self._pin))
        self._uc.hook_add(UC_HOOK_INSN, self._out_hook, None, 1, 0, x86.UC_X86_INS_OUT)
        self._uc.hook_add(UC_HOOK_INSN, self._cpuid_hook, None, 1, 0, x86.UC_X86_INS_CPUID)
        self._uc.hook_add(UC_HOOK_INTR, self._exception_hook)
        self._uc.hook_add(UC_HOOK_MEM_INVALID, self._bad_access_hook)
        self._uc.hook_add(UC_HOOK_INSN_INVALID, self._hypercall_hook)

        self._cond = threading.Condition()
        self._state = VcpuState.PAUSED
        self._detail = ""
        self._thread: threading.Thread | None = None
        self._pause_requested = False
        self._stop_requested = False
        # Set to cut an idle wait short; cleared only while the thread is paused.
        self._wake = threading.Event()
        # Why the guest faulted, written by a hook in the vCPU thread.
        self._fault: str | None = None
        # What Unicorn cannot hold (hidden segment parts) comes from the last VMSA loaded.
        self._loaded = Vmsa()
        self._throttle = 0
        # Measured here, not in the CPUID hook: that would nest a Unicorn run in this one's.
        self._tsc_khz = round(tsc_hz() / 1000)
        self._vmsa = self._read_registers()

    def __enter__(self) -> Vcpu:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Vcpu {self.index} {self._state.value}>"

    @property
    def state(self) -> VcpuState:
        """Where the vCPU is now."""
        return self._state

    @property
    def detail(self) -> str:
        """Why the vCPU halted or crashed (empty otherwise)."""
        return self._detail

    @property
    def thread_started(self) -> bool:
        """Whether :meth:`run_thread` was called (so :meth:`resume` continues a pause)."""
        return self._thread is not None

    @property
    def vmsa(self) -> Vmsa:
        """The registers as last saved: at the last pause, halt or crash, or save/load."""
        return self._vmsa

    # -- register state ---------------------------------------------------------------

    def load_vmsa(self, vmsa: Vmsa) -> None:
        """Set the vCPU's registers from a VMSA.

        Unicorn keeps no hidden part (attributes, limit) for CS, DS, ES and SS
        in 64-bit mode: those, like anything else Unicorn does not model, are
        kept from ``vmsa`` and given back by :meth:`save_vmsa`.

        :param vmsa: the registers to load.
        :raises PlatformError: the vCPU is not paused, or Unicorn refused a value.
        """
        with self._cond:
            self._require_paused("load registers into")
            try:
                self._write_registers(vmsa)
            except UcError as err:
                raise PlatformError(f"vCPU {self.index}: Unicorn refused the VMSA: {err}") from err
            self._loaded = vmsa
            self._vmsa = self._read_registers()

    def save_vmsa(self) -> Vmsa:
        """Read the vCPU's registers into a VMSA.

        :returns: the registers now; also kept as :attr:`vmsa`.
        :raises PlatformError: the vCPU is running.
        """
        with self._cond:
            if self._state is VcpuState.RUNNING:
                raise PlatformError(f"vCPU {self.index} is running: pause it first")
            self._vmsa = self._read_registers()
            return self._vmsa

    # -- execution -----------------------------------------------------------------------

    def run_thread(self) -> None:
        """Start executing at the current RIP in a thread of its own.

        :raises PlatformError: the vCPU was started before.
        """
        with self._cond:
            if self._thread is not None or self._pin is None:
                raise PlatformError(f"vCPU {self.index} was started before")
            self._state = VcpuState.RUNNING
            self._thread = threading.Thread(target=self._run, name=f"vcpu{self.index}",
                                            daemon=True)
            self._thread.start()

    def pause(self, timeout: float = 5.0) -> None:
        """Stop executing at an instruction boundary and save the registers to :attr:`vmsa`.

        The vCPU stops at the end of its current slice.  Does nothing unless
        the vCPU is running (a halted or crashed vCPU is already still).

        :param timeout: seconds to wait for the vCPU thread to stop.
        :raises PlatformError: the thread did not stop in time.
        """
        with self._cond:
            if self._state is not VcpuState.RUNNING:
                return
            self._pause_requested = True
            self._wake.set()
            if not self._cond.wait_for(lambda: self._state is not VcpuState.RUNNING, timeout):
                raise PlatformError(f"vCPU {self.index} did not pause within {timeout} s")

    def resume(self) -> None:
        """Continue executing after :meth:`pause`.

        :raises PlatformError: the vCPU is not paused, or was never started.
        """
        with self._cond:
            if self._thread is None:
                raise PlatformError(f"vCPU {self.index} was never started: use run_thread")
            self._require_paused("resume")
            self._pause_requested = False
            self._wake.clear()
            # RUNNING at once, so that a pause() right after this sees a running vCPU.
            self._state = VcpuState.RUNNING
            self._cond.notify_all()

    @property
    def throttle(self) -> int:
        """Percent of the time the vCPU sleeps instead of running (QEMU's CPU throttle)."""
        return self._throttle

    @throttle.setter
    def throttle(self, percent: int) -> None:
        if not 0 <= percent <= MAX_THROTTLE:
            raise ValueError(f"throttle must be 0-{MAX_THROTTLE} %, not {percent}")
        self._throttle = percent

    def wait(self, timeout: float) -> VcpuState:
        """Wait until the vCPU is no longer running (paused, halted, crashed or stopped).

        :param timeout: seconds to wait at most.
        :returns: the state then (still ``RUNNING`` if the time ran out).
        """
        with self._cond:
            self._cond.wait_for(lambda: self._state is not VcpuState.RUNNING, timeout)
            return self._state

    def stop(self, timeout: float = 5.0) -> None:
        """End the vCPU for good and unmap the RAM (it may be closed afterwards).

        A running or paused vCPU becomes ``STOPPED``; a halted or crashed one
        keeps its state.  Registers can still be saved.  Stopping twice is harmless.

        :param timeout: seconds to wait for the vCPU thread to end.
        :raises PlatformError: the thread did not end in time (the RAM stays mapped).
        """
        with self._cond:
            self._stop_requested = True
            self._wake.set()
            self._cond.notify_all()
            if self._thread is None and self._state is VcpuState.PAUSED:
                self._state = VcpuState.STOPPED
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise PlatformError(f"vCPU {self.index} did not stop within {timeout} s")
        with self._cond:
            if self._pin is not None:
                self._uc.mem_unmap(*self._span)
                self._pin = None

    def _require_paused(self, action: str) -> None:
        """Refuse ``action`` unless the vCPU is paused and still maps its RAM; lock held."""
        if self._state is not VcpuState.PAUSED or self._pin is None:
            raise PlatformError(f"cannot {action} vCPU {self.index}: it is {self._state.value}")

    # -- the vCPU thread -----------------------------------------------------------------

    def _run(self) -> None:
        """The vCPU thread: execute, obey pause and stop requests, record how it ended."""
        while True:
            with self._cond:
                while self._pause_requested and not self._stop_requested:
                    if self._state is not VcpuState.PAUSED:
                        self._vmsa = self._read_registers()
                        self._state = VcpuState.PAUSED
                        self._cond.notify_all()
                    self._cond.wait()
                if self._stop_requested:
                    self._vmsa = self._read_registers()
                    self._state = VcpuState.STOPPED
                    self._cond.notify_all()
                    return
            ended = self._execute()
            if ended is not None:
                with self._cond:
                    self._vmsa = self._read_registers()
                    self._state, self._detail = ended
                    self._cond.notify_all()
                return

    def _execute(self) -> tuple[VcpuState, str] | None:
        """Run the guest slice after slice until a request, a fault or a HLT.

        :returns: None when stopped on request, else the final state and detail.
        """
        while True:
            self._fault = None
            started = time.monotonic()
            try:
                self._uc.emu_start(self._reg(x86.UC_X86_REG_RIP), _NEVER, count=SLICE)
            except UcError as err:
                rip = self._reg(x86.UC_X86_REG_RIP)
                return VcpuState.CRASHED, self._fault or f"{err} at rip={rip:#x}"
            except Exception as err:  # Unicorn re-raises here what a port handler raised
                return VcpuState.CRASHED, f"port write handler failed: {err!r}"
            if self._fault is not None:
                return VcpuState.CRASHED, self._fault
            rip = self._reg(x86.UC_X86_REG_RIP)
            if self._follows_hlt(rip):
                return VcpuState.HALTED, f"hlt at rip={rip - 1:#x}"
            # Read without the lock: a request that lands just after is seen a slice later.
            if self._pause_requested or self._stop_requested:
                return None
            if throttle := self._throttle:
                # Sleep so that running takes (100 - throttle) % of the time, as
                # QEMU's throttle does; a pause request cuts the sleep short.
                self._wake.wait((time.monotonic() - started) * throttle / (100 - throttle))

    def _follows_hlt(self, rip: int) -> bool:
        """Whether the byte before ``rip`` is a HLT opcode."""
        try:
            return self._uc.mem_read((rip - 1) % (1 << 64), 1)[0] == _HLT
        except UcError:  # not RAM before rip: no HLT there
            return False

    def _out_hook(self, _uc: Uc, port: int, size: int, value: int, _data: object) -> None:
        """An ``out``: idle, or hand it to the machine."""
        if port == IDLE_PORT:
            self._wake.wait(min(value, MAX_IDLE_US) / 1e6)
        elif self._on_port_write is not None:
            self._on_port_write(port, size, value)

    def _cpuid_hook(self, uc: Uc, _data: object) -> bool:
        """A CPUID: answer the hypervisor leaves, leave the others to Unicorn.

        :returns: True when answered here (Unicorn then skips its own CPUID).
        """
        leaf = self._reg(x86.UC_X86_REG_RAX) & 0xFFFF_FFFF  # CPUID reads EAX only
        if not CPUID_HV_BASE <= leaf <= CPUID_HV_TIMING:
            return False
        if leaf == CPUID_HV_BASE:
            answer: tuple[int, ...] = (CPUID_HV_TIMING, *struct.unpack("<3I", CPUID_HV_VENDOR))
        elif leaf == CPUID_HV_TIMING:
            answer = (self._tsc_khz, 0, 0, 0)
        else:
            answer = (0, 0, 0, 0)
        for reg, value in zip(_CPUID_OUT, answer, strict=True):
            uc.reg_write(reg, value)
        return True

    def _exception_hook(self, uc: Uc, vector: int, _data: object) -> None:
        """A CPU exception: the guests have no IDT, so it ends the vCPU."""
        name = _VECTORS.get(vector, f"#{vector}")
        where = f"rip={self._reg(x86.UC_X86_REG_RIP):#x}"
        if vector == 14:
            where += f", address {self._reg(x86.UC_X86_REG_CR2):#x}"
        self._fault = f"CPU exception {name} (vector {vector}) at {where}"
        uc.emu_stop()

    def _hypercall_hook(self, uc: Uc, _data: object) -> bool:
        """An invalid instruction: emulate a ``vmmcall``; anything else crashes the vCPU.

        :returns: True when handled (execution continues after the ``vmmcall``).
        """
        rip = self._reg(x86.UC_X86_REG_RIP)
        try:
            if uc.mem_read(rip, len(VMMCALL)) != VMMCALL:
                return False
        except UcError:  # the instruction straddles the end of RAM: not ours
            return False
        number = self._reg(x86.UC_X86_REG_RAX)
        reg = self._reg
        args = (reg(x86.UC_X86_REG_RBX), reg(x86.UC_X86_REG_RCX), reg(x86.UC_X86_REG_RDX),
                reg(x86.UC_X86_REG_RSI))
        if self._on_hypercall is None:
            result = -KVM_ENOSYS
        else:
            try:
                result = self._on_hypercall(number, args)
            except Exception as err:  # the guest must not take the machine down
                self._fault = f"hypercall {number} handler failed at rip={rip:#x}: {err!r}"
                return False
        uc.reg_write(x86.UC_X86_REG_RAX, result % (1 << 64))
        uc.reg_write(x86.UC_X86_REG_RIP, rip + len(VMMCALL))
        return True

    def _bad_access_hook(self, _uc: Uc, access: int, address: int, size: int, _value: int,
                         _data: object) -> bool:
        """An access to a GPA outside the RAM mapping: note it, and let Unicorn fail."""
        kind = ("read" if access in (UC_MEM_READ_UNMAPPED, UC_MEM_READ_PROT) else
                "fetch" if access in (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT) else "write")
        self._fault = (f"{kind} of {size} bytes at {address:#x}, outside guest RAM "
                       f"(rip={self._reg(x86.UC_X86_REG_RIP):#x})")
        return False  # not handled: Unicorn stops with an error

    # -- Unicorn registers <-> Vmsa ------------------------------------------------------

    def _reg(self, reg: int) -> int:
        """One plain Unicorn register as an int."""
        return int(self._uc.reg_read(reg))

    def _read_registers(self) -> Vmsa:
        """Unicorn's registers as a Vmsa, hidden segment parts from the last VMSA loaded."""
        loaded, reg = self._loaded, self._reg
        values: dict[str, Any] = {name: reg(r) for name, r in _PLAIN.items()}
        values.update({"cr0": reg(x86.UC_X86_REG_CR0), "cr3": reg(x86.UC_X86_REG_CR3),
                       "cr4": reg(x86.UC_X86_REG_CR4),
                       "efer": int(self._uc.reg_read(x86.UC_X86_REG_MSR, _EFER)),
                       "xmm": tuple(reg(r) for r in _XMM)})
        for name, r in _SELECTORS.items():
            values[name] = attrs.evolve(getattr(loaded, name), selector=reg(r))
        for name, (selector, base) in _FS_GS.items():
            values[name] = attrs.evolve(getattr(loaded, name), selector=reg(selector),
                                        base=reg(base))
        for name, r in _TABLES.items():
            selector, base, limit, flags = self._uc.reg_read(r)
            if name in ("gdtr", "idtr"):
                values[name] = attrs.evolve(getattr(loaded, name), base=base, limit=limit)
            else:
                values[name] = Segment(selector, _attrib(flags), limit, base)
        return Vmsa(**values)

    def _write_registers(self, vmsa: Vmsa) -> None:
        """Set Unicorn's registers from a Vmsa, as far as Unicorn holds them."""
        uc = self._uc
        # Paging controls first and CR0 last: setting CR0.PG enters long mode
        # only when CR4.PAE and EFER.LME are already set, as on hardware.
        uc.reg_write(x86.UC_X86_REG_CR4, vmsa.cr4)
        uc.reg_write(x86.UC_X86_REG_CR3, vmsa.cr3)
        uc.reg_write(x86.UC_X86_REG_MSR, (_EFER, vmsa.efer))
        uc.reg_write(x86.UC_X86_REG_CR0, vmsa.cr0)
        for name, r in _TABLES.items():
            seg: Segment = getattr(vmsa, name)
            uc.reg_write(r, (seg.selector, seg.base, seg.limit, _flags(seg.attrib)))
        for name, r in _SELECTORS.items():
            uc.reg_write(r, getattr(vmsa, name).selector)
        for name, (selector, base) in _FS_GS.items():
            seg = getattr(vmsa, name)
            # Writing the selector loads its descriptor (a guest-visible act): only on change.
            if self._reg(selector) != seg.selector:
                uc.reg_write(selector, seg.selector)
            uc.reg_write(base, seg.base)
        for name, r in _PLAIN.items():
            uc.reg_write(r, getattr(vmsa, name))
        for r, value in zip(_XMM, vmsa.xmm, strict=True):
            uc.reg_write(r, value)


def _attrib(flags: int) -> int:
    """QEMU's descriptor flags (the descriptor's high dword) to VMCB ``attrib``."""
    return (flags >> 8) & 0xFF | (flags >> 12) & 0xF00


def _flags(attrib: int) -> int:
    """VMCB ``attrib`` to QEMU's descriptor flags."""
    return (attrib & 0xFF) << 8 | (attrib & 0xF00) << 12


@functools.cache
def tsc_hz() -> float:
    """How fast the TSC that guests read with RDTSC counts, in ticks per second.

    Unicorn passes the host's TSC through; this measures it once per process
    with a two-instruction guest (``rdtsc; hlt``) over 20 ms.  Guests learn
    it through CPUID's timing leaf (:data:`CPUID_HV_TIMING`).

    :returns: the TSC frequency, e.g. 2.1e9.
    :raises PlatformError: the TSC does not advance.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, PAGE_SIZE)
    uc.mem_write(0, b"\x0f\x31\xf4")

    def sample() -> tuple[int, int]:
        before = time.perf_counter_ns()
        uc.emu_start(0, _NEVER)
        after = time.perf_counter_ns()
        tsc = int(uc.reg_read(x86.UC_X86_REG_RAX)) | int(uc.reg_read(x86.UC_X86_REG_RDX)) << 32
        return (before + after) // 2, tsc

    first = sample()
    time.sleep(0.02)
    last = sample()
    hz = (last[1] - first[1]) * 1e9 / (last[0] - first[0])
    if hz <= 0:
        raise PlatformError(f"the TSC Unicorn gives guests does not advance ({first}, {last})")
    return hz
