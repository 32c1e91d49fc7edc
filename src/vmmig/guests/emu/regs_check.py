"""The register-torture guest's checkpoint chain, verified on a copy or mapping of guest RAM.

``regs.S`` keeps its state in 14 GPRs, XMM0-15 and an iteration counter,
mixes them every iteration with one recurrence, and every ``interval``
iterations appends a checkpoint (iteration, full register state, chained
hash) to a ring.  :func:`check_regs_chain` recomputes every checkpoint in
the ring from the one before it with :func:`step`, this module's copy of the
recurrence, and checks the hashes: a register lost or altered between two
checkpoints (across a pause, a save/load of the VMSA, a migration) breaks
that link and is reported with the checkpoint where it shows.

The layouts of the block at :data:`REGS_INFO` and of a ring entry are in
``regs.S``.  Sans-IO: the functions take a bytes-like object of the whole
guest RAM (GPA 0 at offset 0).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

import attrs
import numpy as np
import numpy.typing as npt

from vmmig.errors import IntegrityError


if TYPE_CHECKING:
    from typing_extensions import Buffer


__all__ = ["ENTRY_SIZE", "REGS_INFO", "RegsCheck", "check_regs_chain", "regs_checkpoints", "step"]

#: Physical address of the regs guest's block.
REGS_INFO: Final = 0x700
#: Bytes per ring entry.
ENTRY_SIZE: Final = 512

_INFO = struct.Struct("<6Q")
_GPRS = 14
_XMMS = 16
#: Entry layout in u64 words: iteration, previous hash, hash, GPRs, XMMs (low half first).
_W_ITER, _W_PREV, _W_HASH, _W_GPR, _W_XMM = 0, 1, 2, 0x20 // 8, 0x100 // 8
#: The words the chained hash covers, in order.
_HASHED = (_W_ITER, *range(_W_GPR, _W_GPR + _GPRS), *range(_W_XMM, _W_XMM + 2 * _XMMS))
_HASH_MUL = np.uint64(0x5BD1E995)
_ROT = {0: 7, 2: 13, 4: 17, 6: 23, 8: 29, 10: 31, 12: 37}
_MUL = {1: 0x2545F491, 3: 0x5851F42D, 5: 0x6C078965, 7: 0x41C64E6D, 9: 0x0019660D,
        11: 0x27D4EB2F, 13: 0x165667B1}

U64s = npt.NDArray[np.uint64]


@attrs.frozen
class RegsCheck:
    """The verdict of :func:`check_regs_chain` on one memory image.

    :param ok: every checkpoint in the ring follows from the one before it.
    :param checkpoints: how many checkpoints the guest has written.
    :param verified: how many consecutive pairs were recomputed and matched
        (before the first bad one, if any).
    :param first_bad: number of the first checkpoint that does not follow, None if ok.
    :param detail: one line for humans.
    """

    ok: bool
    checkpoints: int
    verified: int
    first_bad: int | None
    detail: str


def _rol(value: U64s, bits: int) -> U64s:
    result: U64s = (value << np.uint64(bits)) | (value >> np.uint64(64 - bits))
    return result


def step(gprs: list[U64s], xmms: list[tuple[U64s, U64s]], iteration: U64s) -> None:
    """Advance the regs guest's state by one iteration, in place (``regs.S``'s loop).

    Works on arrays, so one call advances many independent states at once.

    :param gprs: RAX RBX RCX RDX RSI RDI RBP R8-R14, each an array of states.
    :param xmms: XMM0-15 as (low half, high half) arrays.
    :param iteration: R15, the iteration number; incremented.
    """
    gprs[0] = gprs[0] + iteration
    for k in range(_GPRS):
        prev = gprs[k - 1]
        if k % 2 == 0:
            gprs[k] = _rol(gprs[k] ^ prev, _ROT[k])
        else:
            gprs[k] = (gprs[k] + prev) * np.uint64(_MUL[k])
    for j in range(_XMMS):
        (low, high), (prev_low, prev_high) = xmms[j], xmms[j - 1]
        if j % 2 == 0:
            low, high = low + prev_low, high + prev_high
        else:
            low, high = low ^ prev_low, high ^ prev_high
        xmms[j] = (high, low)  # pshufd $0x4e swaps the halves
    low, high = xmms[0]
    xmms[0] = (low + gprs[12], high + gprs[13])
    low, high = xmms[_XMMS - 1]
    gprs[0] = gprs[0] + low
    gprs[1] = gprs[1] ^ high
    iteration += np.uint64(1)


def _chain_hash(entries: U64s) -> U64s:
    """The hash each entry should carry, from its own words and its previous-hash field."""
    h = entries[:, _W_PREV].copy()
    for word in _HASHED:
        h ^= entries[:, word]
        h *= _HASH_MUL
        h ^= h >> np.uint64(29)
    return h


def regs_checkpoints(memory: Buffer) -> int:
    """How many checkpoints the regs guest has written.

    :param memory: the whole guest RAM.
    :returns: the guest's checkpoint counter; it grows while the guest runs.
    """
    with memoryview(memory) as mv:
        count: int = _INFO.unpack_from(mv, REGS_INFO)[3]
    return count


def check_regs_chain(memory: Buffer, *, since: int | None = None) -> RegsCheck:
    """Verify the regs guest's checkpoint ring on a memory image.

    The ring keeps the newest checkpoints only (some seconds' worth: see
    :class:`~vmmig.guests.emu.RegsParams`), so a break must be checked before
    the ring wraps past it.  The slot the guest writes next may be half
    written, so the oldest entry of a full ring is not used.

    :param memory: the whole guest RAM, with the guest paused or stopped.
    :param since: check from this checkpoint number on (e.g. the count before
        a pause, minus one); every checkpoint in the ring if None, which costs
        time in proportion to the ring's size.
    :returns: the verdict; a broken chain, or a ``since`` the ring no longer
        holds, is reported, not raised.
    :raises IntegrityError: the block at :data:`REGS_INFO` describes no ring
        (the guest has not run, or is not the regs guest).
    """
    with memoryview(memory) as mv, mv.cast("B") as flat:
        start, end, interval, count, _, _ = _INFO.unpack_from(flat, REGS_INFO)
        slots = (end - start) // ENTRY_SIZE
        if (start % ENTRY_SIZE or end % ENTRY_SIZE or slots < 2 or end > flat.nbytes
                or interval < 1 or count < 1):
            raise IntegrityError(
                f"no regs checkpoint ring at {REGS_INFO:#x} (ring [{start:#x}, {end:#x}), "
                f"interval {interval}, {count} checkpoints): guest not started, or not regs")
        oldest = count - min(count, slots - 1)
        first = oldest if since is None else max(since, 0)
        if not oldest <= first < count:
            detail = (f"checkpoint {first} is not in the ring, which holds checkpoints "
                      f"{oldest}..{count - 1}")
            return RegsCheck(ok=False, checkpoints=count, verified=0, first_bad=None,
                             detail=detail)
        ring = np.frombuffer(flat[start:end], dtype="<u8").reshape(slots, ENTRY_SIZE // 8)
        entries = ring[np.arange(first, count) % slots].astype(np.uint64)
    return _judge(entries, first, count, interval)


def _judge(entries: U64s, first: int, count: int, interval: int) -> RegsCheck:
    """Check iteration numbers, hash links and the recurrence between neighbours."""
    n = len(entries)
    numbers = np.arange(first, count, dtype=np.uint64)
    problems: list[tuple[int, str]] = []

    wrong_iter = np.flatnonzero(entries[:, _W_ITER] != numbers * np.uint64(interval))
    if wrong_iter.size:
        i = int(wrong_iter[0])
        problems.append((i, f"iteration {int(entries[i, _W_ITER])}, expected "
                            f"{(first + i) * interval}"))
    wrong_hash = np.flatnonzero(_chain_hash(entries) != entries[:, _W_HASH])
    if wrong_hash.size:
        problems.append((int(wrong_hash[0]), "its hash does not match its contents"))
    wrong_link = np.flatnonzero(entries[1:, _W_PREV] != entries[:-1, _W_HASH])
    if wrong_link.size:
        problems.append((int(wrong_link[0]) + 1, "it does not chain to the entry before it"))
    if first == 0 and entries[0, _W_PREV] != 0:
        problems.append((0, "the first entry chains to something"))

    if n > 1:
        before = entries[:-1]
        gprs = [before[:, _W_GPR + k].copy() for k in range(_GPRS)]
        xmms = [(before[:, _W_XMM + 2 * j].copy(), before[:, _W_XMM + 2 * j + 1].copy())
                for j in range(_XMMS)]
        iteration = before[:, _W_ITER].copy()
        for _ in range(interval):
            step(gprs, xmms, iteration)
        after = entries[1:]
        mismatch = np.zeros(n - 1, dtype=bool)
        for k in range(_GPRS):
            mismatch |= gprs[k] != after[:, _W_GPR + k]
        for j, (low, high) in enumerate(xmms):
            mismatch |= (low != after[:, _W_XMM + 2 * j]) | (high != after[:, _W_XMM + 2 * j + 1])
        if (bad := np.flatnonzero(mismatch)).size:
            i = int(bad[0])
            names = _differing(gprs, xmms, after, i)
            problems.append((i + 1, f"registers {names} differ from the recomputation of "
                                    f"{interval} iterations from checkpoint {first + i}"))

    span = f"checkpoints {first}..{count - 1}"
    if not problems:
        detail = (f"regs chain intact: {span}, {n - 1} links of {interval} iterations "
                  "recomputed")
        return RegsCheck(ok=True, checkpoints=count, verified=n - 1, first_bad=None,
                         detail=detail)
    i, why = min(problems)
    detail = f"regs chain broken at checkpoint {first + i} of {span}: {why}"
    return RegsCheck(ok=False, checkpoints=count, verified=max(i - 1, 0), first_bad=first + i,
                     detail=detail)


def _differing(gprs: list[U64s], xmms: list[tuple[U64s, U64s]], after: U64s, i: int) -> str:
    """Names of the registers whose recomputed value differs at pair ``i``."""
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14")
    out = [name for k, name in enumerate(names) if gprs[k][i] != after[i, _W_GPR + k]]
    out += [f"xmm{j}" for j, (low, high) in enumerate(xmms)
            if low[i] != after[i, _W_XMM + 2 * j] or high[i] != after[i, _W_XMM + 2 * j + 1]]
    return ", ".join(out)
