"""Guest-shared pages: KVM_HC_MAP_GPA_RANGE on an emulated machine, and what the host learns.

An SEV guest shares pages with the hypervisor (the Migration Handler's
mailbox and transfer buffers) the way Linux and OVMF do on KVM: it clears
the C-bit in its page tables and tells the hypervisor with hypercall 12,
KVM_HC_MAP_GPA_RANGE (``include/uapi/linux/kvm_para.h``)::

    RAX = 12, RBX = gpa, RCX = number of 4 KiB pages,
    RDX = attributes: bits 0-3 page size hint (0 4 KiB, 1 2 MiB, 2 1 GiB),
          bit 4 KVM_MAP_GPA_RANGE_ENCRYPTED (1 private, 0 shared)
    vmmcall -> RAX = 0, or -KVM_EINVAL (-22), or -KVM_ENOSYS (-1000)

The emulation does not model the C-bit: the hypercall alone moves a page
between private RAM and the shared segment (:class:`~.memory.GuestMemory`),
for the vCPUs and the host alike.  Checks, as KVM's ``kvm_emulate_hypercall``
makes them (RAX = -KVM_EINVAL): ``gpa`` page-aligned, at least one page, no
wrap-around; and, as the VMM would refuse them (QEMU stops the vCPU; here
the guest gets -KVM_EINVAL and runs on): pages beyond guest RAM, attribute
bits other than the two fields, a page size hint above 1 GiB.  The page
count is in 4 KiB pages whatever the hint, as in KVM.  Pages already in the
requested state are left alone (their content too).

A plain machine answers -KVM_ENOSYS, as KVM does for a VM whose VMM did not
ask for this hypercall (``KVM_CAP_EXIT_HYPERCALL``): it has no private
memory, every page is host-visible already.  Any other hypercall number
answers -KVM_ENOSYS on every machine.

Why no vCPU pauses: a conversion replaces the pages' backing under the RAM
mapping with one ``mmap(MAP_FIXED)``, which the kernel does atomically, and
the mapping's address (all Unicorn holds) does not change; so other vCPUs
keep running, and one that touches the range meanwhile reaches either the
old backing or the new one, as it would race a conversion on hardware.
The conversion runs in the calling vCPU's thread and costs a few system
calls; it is held only against other conversions, host accesses through
:class:`~.memory.GuestMemory` and the dirty log (:meth:`.DirtyLog.replacing`).

The host follows changes by the ``X_MEMORY_ATTRIBUTES`` event, one per run
of pages that changed (``{"gpa", "pages", "shared"}``), sent from the
vCPU's thread before the hypercall returns, and asks for the whole picture
with ``x-query-shared`` (``x-query-memory`` carries it too).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from typing import Final

from vmmig.platforms.emu.dirtylog import DirtyLog
from vmmig.platforms.emu.memory import GuestMemory
from vmmig.platforms.emu.qmp_schema import CommandTable
from vmmig.platforms.emu.vcpu import KVM_ENOSYS


__all__ = ["ATTRIBUTES_EVENT", "KVM_EINVAL", "KVM_HC_MAP_GPA_RANGE", "MAP_GPA_RANGE_ENCRYPTED",
           "SharedPages"]

#: The hypercall number (``include/uapi/linux/kvm_para.h``).
KVM_HC_MAP_GPA_RANGE: Final = 12
#: Attribute bit 4: the range becomes private (encrypted); clear: shared.
MAP_GPA_RANGE_ENCRYPTED: Final = 1 << 4
#: KVM's EINVAL (``kvm_para.h`` defines KVM_EINVAL as EINVAL).
KVM_EINVAL: Final = 22
#: The event sent when the guest changes pages' sharing.
ATTRIBUTES_EVENT: Final = "X_MEMORY_ATTRIBUTES"

PAGE: Final = 4096
_PAGE_SIZE_MASK: Final = 0xF
_LARGEST_PAGE_SIZE_HINT: Final = 2  # 1 GiB
_KNOWN_ATTRIBUTES: Final = _PAGE_SIZE_MASK | MAP_GPA_RANGE_ENCRYPTED
_U64: Final = 1 << 64

#: ``emit(event, data)``, as :attr:`~.machine.Machine.on_event`.
EventSink = Callable[[str, Mapping[str, object] | None], None]


class SharedPages:
    """One machine's guest-shared pages: the hypercall that sets them and their QMP view.

    :param memory: the machine's RAM; shared pages need its shared segment.
    :param dirty_log: gives the machine's dirty log now (None when off),
        told about pages that get a new backing.
    :param emit: sends a QMP event.
    """

    def __init__(self, memory: GuestMemory, *, dirty_log: Callable[[], DirtyLog | None],
                 emit: EventSink) -> None:
        self._memory = memory
        self._dirty_log = dirty_log
        self._emit = emit
        #: Held while pages change backing: hold it to open or close a dirty log,
        #: so no conversion falls between the log's start and the machine's note of it.
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether the guest may share pages (an SEV machine's RAM has a shared segment)."""
        return self._memory.shared_path is not None

    def hypercall(self, number: int, args: tuple[int, int, int, int]) -> int:
        """A vCPU's ``vmmcall``: the result for RAX (the vCPU's hypercall handler)."""
        if number == KVM_HC_MAP_GPA_RANGE and self.enabled:
            return self.map_gpa_range(*args[:3])
        return -KVM_ENOSYS

    def map_gpa_range(self, gpa: int, pages: int, attributes: int) -> int:
        """Make ``pages`` pages from ``gpa`` private or shared; 0 or -KVM_EINVAL."""
        first = gpa // PAGE
        if (gpa % PAGE or pages == 0 or gpa + pages * PAGE >= _U64
                or attributes & ~_KNOWN_ATTRIBUTES
                or attributes & _PAGE_SIZE_MASK > _LARGEST_PAGE_SIZE_HINT
                or first + pages > self._memory.size // PAGE):
            return -KVM_EINVAL
        shared = not attributes & MAP_GPA_RANGE_ENCRYPTED
        with self.lock:
            for start, count in self._memory.runs_to_convert(first, pages, shared):
                log = self._dirty_log()
                with log.replacing(start, count) if log is not None else contextlib.nullcontext():
                    self._memory.convert(start, count, shared)
                self._emit(ATTRIBUTES_EVENT, {"gpa": start * PAGE, "pages": count,
                                              "shared": shared})
        return 0

    # -- QMP -------------------------------------------------------------------------

    def register(self, commands: CommandTable) -> None:
        """Add ``x-query-shared`` to a machine's commands."""
        commands.add("x-query-shared", self.query_shared)

    def query_shared(self) -> list[dict[str, int]]:
        """The shared ranges, ``[{"gpa", "pages"}]`` in address order (empty on plain)."""
        return [{"gpa": first * PAGE, "pages": count}
                for first, count in self._memory.shared_runs()]

    def query_memory(self) -> dict[str, object]:
        """What ``x-query-memory`` adds: the shared segment's path and ranges."""
        path = self._memory.shared_path
        return {"shared-path": None if path is None else str(path),
                "shared": self.query_shared()}
