"""Page records: one AES-256-GCM seal per batch of pages, and the checks on arrival.

A page record is an :mod:`~vmmig.firmware.envelope` of kind PAGES whose
entries are the batch's ``(GPA, version)`` pairs and whose body is::

    zero bitmap   8 * ceil(n / 64) bytes; bit i (LSB first) set = page i is zero
    pages         4096 * n bytes: the non-zero pages in entry order, then zero fill

Zero pages are elided only inside the ciphertext (an MH may elide none: a
run of consecutive pages is sealed straight from RAM, unelided), and the
fill keeps the body at its full size: a record's size depends on ``n`` alone, so the host, which
sees only sizes, cannot tell which pages are zero.  (With constant sizes the
bitmap saves no bytes on the wire; it is there so that a later compressing
format can keep the same secrecy rule.)

A page's *version* counts its exports: the source bumps it at each export,
the target accepts a page only as the successor of the version it holds.
With the record sequence number (strictly +1 per record) this detects:

=====================  =========================================  ===========
attack                 what catches it                            status
=====================  =========================================  ===========
bit flip anywhere      GCM tag (header/entries are the AD)        AUTH_FAILED
GPAs swapped           GCM tag (GPAs are in the AD)               AUTH_FAILED
other migration        session id, then keys                      AUTH_FAILED
replay                 sequence number below the expected one     REPLAY
drop, reorder          sequence number above the expected one     OUT_OF_ORDER
stale page             version not held + 1                       OUT_OF_ORDER
truncated stream       manifest: record count, version digest     MISMATCH
=====================  =========================================  ===========

The tag is checked before the sequence number: until then the number could
be the host's invention.  A record refused for its framing (BAD_REQUEST,
TOO_LARGE) changes nothing.  A record of consecutive pages that elides no
zero page is decrypted straight into their RAM, before its tag is checked
(one pass over the pages fewer): a refusal after that is an integrity
failure (AUTH_FAILED, REPLAY, OUT_OF_ORDER), which poisons the session (the
handler's ``failed`` state: it never commits, so the guest never runs on
what those pages hold); a gathered record changes nothing until all its
checks passed.

The stream carries entry-less records of other kinds too (CPU state,
:mod:`vmmig.firmware.cpus`): :meth:`RecordSealer.seal_body_into` and
:meth:`RecordOpener.open_body` number them with the same counter, so the
table's replay, order and truncation checks cover them as well.  (The kind is
in the nonce: one counter for several kinds repeats no (key, nonce) pair.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vmmig.firmware import envelope
from vmmig.firmware.abi import PAGE_SIZE, Refusal, Status
from vmmig.firmware.envelope import ENTRY, Direction, RecordKind


__all__ = [
    "RecordOpener",
    "RecordSealer",
    "bitmap_bytes",
    "page_body_length",
    "page_indices",
    "page_record_size",
]

_KIND: Final = RecordKind.PAGES
_DIRECTION: Final = Direction.SOURCE_TO_TARGET

Memory = npt.NDArray[np.uint8]


def bitmap_bytes(count: int) -> int:
    """Bytes of the zero bitmap of a ``count``-page record (whole u64 words)."""
    return 8 * ((count + 63) // 64)


def page_body_length(count: int) -> int:
    """Plaintext bytes of a ``count``-page record, zero pages or not."""
    return bitmap_bytes(count) + PAGE_SIZE * count


def page_record_size(count: int) -> int:
    """Bytes of a sealed ``count``-page record: a function of ``count`` alone."""
    return envelope.record_size(count, page_body_length(count))


def page_indices(gpas: npt.NDArray[np.uint64], ram_pages: int) -> npt.NDArray[np.intp]:
    """Page frame numbers of ``gpas``; Refusal(BAD_REQUEST) unless aligned, in RAM, distinct."""
    if len(gpas) == 0:
        raise Refusal(Status.BAD_REQUEST, "a batch needs at least one page")
    if np.any(gpas % PAGE_SIZE) or np.any(gpas >= ram_pages * PAGE_SIZE):
        raise Refusal(Status.BAD_REQUEST, "GPA not page-aligned or outside RAM")
    frames = (gpas // PAGE_SIZE).astype(np.intp)
    ordered = np.sort(frames)  # 10x cheaper than np.unique for a batch
    if np.any(ordered[1:] == ordered[:-1]):
        raise Refusal(Status.BAD_REQUEST, "a GPA twice in one batch")
    return frames


def _is_run(frames: npt.NDArray[np.intp]) -> bool:
    """Whether a batch is consecutive pages in ascending order (at least two)."""
    return len(frames) > 1 and int(frames[-1]) - int(frames[0]) == len(frames) - 1 and \
        bool(np.all(np.diff(frames) == 1))


def _pages_of(scratch: bytearray, count: int) -> Memory:
    """The page area of a ``count``-page body in ``scratch``, as (count, 4096)."""
    flat = np.frombuffer(scratch, np.uint8, PAGE_SIZE * count, bitmap_bytes(count))
    return flat.reshape(count, PAGE_SIZE)


@attrs.define
class _PageStream:
    """What both ends of a page stream hold: RAM, key, versions, sequence, scratch.

    :ivar memory: guest RAM, plaintext, ``(pages, 4096)`` uint8.
    :ivar versions: per page, its latest version sent (source) or held (target).
    :ivar next_seq: sequence number of the next record.
    """

    memory: Memory
    key: bytes = attrs.field(repr=False)
    session_id: bytes
    max_batch: int
    versions: npt.NDArray[np.uint64] = attrs.field(init=False, repr=False)
    next_seq: int = attrs.field(init=False, default=0)
    _aead: AESGCM = attrs.field(init=False, repr=False)
    _scratch: bytearray = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self.versions = np.zeros(len(self.memory), np.uint64)
        self._aead = AESGCM(self.key)
        self._scratch = bytearray(page_body_length(self.max_batch))


@attrs.define
class RecordSealer(_PageStream):
    """Source side: seals batches of guest pages and counts their versions."""

    def seal_into(self, gpas: npt.NDArray[np.uint64], out: memoryview) -> int:
        """Seal the pages at ``gpas`` into ``out`` as the next record; return its size.

        ``out`` must hold :func:`page_record_size` bytes.  Refusal on a bad
        batch, before any version or the sequence number moves.
        """
        if len(gpas) > self.max_batch:
            raise Refusal(Status.TOO_LARGE, f"{len(gpas)} pages > max batch {self.max_batch}")
        frames = page_indices(gpas, len(self.memory))
        count = len(frames)
        if len(out) < page_record_size(count):
            raise Refusal(Status.TOO_LARGE, "record does not fit the reply buffer")
        if _is_run(frames):
            return self._seal_run(gpas, frames, out)
        return self._seal_gathered(gpas, frames, out)

    def _seal_gathered(self, gpas: npt.NDArray[np.uint64], frames: npt.NDArray[np.intp],
                       out: memoryview) -> int:
        """Gather the pages into the scratch body, zero pages elided, and seal it."""
        count = len(frames)
        pages = _pages_of(self._scratch, count)
        # mode="clip" (frames are checked) lets numpy gather straight into ``out``.
        np.take(self.memory, frames, axis=0, out=pages, mode="clip")
        nonzero = pages.view("<u8").max(axis=1) != 0  # twice as fast as any(axis=1)
        bitmap = np.frombuffer(self._scratch, np.uint8, bitmap_bytes(count))
        bitmap[:] = 0
        packed = np.packbits(~nonzero, bitorder="little")
        bitmap[: len(packed)] = packed
        kept = int(np.count_nonzero(nonzero))
        if kept < count:
            # Gather the non-zero pages again, packed: cheaper than compacting in place,
            # which numpy does through a temporary copy.
            np.take(self.memory, frames[nonzero], axis=0, out=pages[:kept], mode="clip")
            pages[kept:] = 0
        body = memoryview(self._scratch)[: page_body_length(count)]
        return self._seal_next(out, _KIND, self._next_entries(gpas, frames), [body])

    def _seal_run(self, gpas: npt.NDArray[np.uint64], frames: npt.NDArray[np.intp],
                  out: memoryview) -> int:
        """Seal consecutive pages straight from RAM, no zero page elided: one pass over
        the pages instead of three (gather, zero test, seal); the same format."""
        count = len(frames)
        run = self.memory[int(frames[0]):int(frames[0]) + count].reshape(-1)
        return self._seal_next(out, _KIND, self._next_entries(gpas, frames),
                               [bytes(bitmap_bytes(count)), run.data])

    def _next_entries(self, gpas: npt.NDArray[np.uint64], frames: npt.NDArray[np.intp]
                      ) -> npt.NDArray[np.void]:
        """Bump the pages' versions; the record's entries."""
        self.versions[frames] += np.uint64(1)
        entries = np.empty(len(frames), ENTRY)
        entries["gpa"] = gpas
        entries["version"] = self.versions[frames]
        return entries

    def seal_body_into(self, kind: RecordKind, body: bytes, out: memoryview) -> int:
        """Seal ``body`` into ``out`` as the next record, of ``kind`` and without
        entries; return its size."""
        return self._seal_next(out, kind, None, [body])

    def _seal_next(self, out: memoryview, kind: RecordKind,
                   entries: npt.NDArray[np.void] | None,
                   parts: Sequence[bytes | memoryview]) -> int:
        """Seal the body ``parts`` into ``out`` as the stream's next record; its size."""
        size = envelope.seal_parts_into(
            self.key,
            out,
            kind=kind,
            direction=_DIRECTION,
            session_id=self.session_id,
            seq=self.next_seq,
            entries=entries,
            parts=parts,
        )
        self.next_seq += 1
        return size

    def seal(self, gpas: npt.NDArray[np.uint64]) -> bytes:
        """:meth:`seal_into` a fresh buffer (tests, benchmarks)."""
        out = bytearray(page_record_size(len(gpas)))
        self.seal_into(gpas, memoryview(out))
        return bytes(out)


@attrs.define
class RecordOpener(_PageStream):
    """Target side: authenticates page records and writes them into (writable) guest RAM.

    A page never received holds version 0.
    """

    def open(self, record: bytes | bytearray | memoryview) -> tuple[int, int]:
        """Check ``record`` and install its pages; return ``(seq, page count)``.

        Refusal with the status of the first check that fails (see the
        module's table); guest memory and all state are then unchanged.
        """
        env = envelope.parse(
            record,
            session_id=self.session_id,
            kind=_KIND,
            direction=_DIRECTION,
            max_count=self.max_batch,
        )
        count = len(env.entries)
        if env.body_length != page_body_length(count):
            raise Refusal(Status.BAD_REQUEST, "page body length disagrees with its page count")
        frames = page_indices(env.entries["gpa"], len(self.memory))
        if _is_run(frames):
            in_place = self._open_run(env, int(frames[0]))
        else:
            envelope.open_into(self._aead, env, memoryview(self._scratch)[: env.body_length])
            in_place = False
        self._accept(env, frames, scatter=not in_place)
        return env.seq, count

    def _open_run(self, env: envelope.Envelope, first: int) -> bool:
        """Open a record of consecutive pages; if it elides no zero page, decrypt it
        straight into their RAM (one pass fewer).  Whether it did; else the body is in
        the scratch buffer, as :func:`envelope.open_into` leaves it.

        Pages may change here before the tag is checked: any refusal that follows
        is an integrity failure, which poisons the session for good.
        """
        count = len(env.entries)
        split = bitmap_bytes(count)
        context = envelope.decryptor(self.key, env)
        body = env.sealed[: env.body_length]
        bitmap = memoryview(self._scratch)[:split]
        envelope.stream_into(context, body[:split], bitmap)
        if any(bitmap):
            envelope.stream_into(context, body[split:],
                                 memoryview(self._scratch)[split: env.body_length])
        else:
            run = self.memory[first:first + count].reshape(-1)
            envelope.stream_into(context, body[split:], memoryview(run.data).cast("B"))
        try:
            context.finalize()
        except InvalidTag:
            raise Refusal(Status.AUTH_FAILED, "record tag does not verify") from None
        return not any(bitmap)

    def open_body(self, record: bytes | bytearray | memoryview, kind: RecordKind,
                  body_length: int) -> bytes:
        """Check an entry-less record of ``kind`` as the next one and take its sequence
        number; its body.

        The checks and statuses are the page records'.  The caller's own checks
        of the body come after the number is taken: their refusals must be
        integrity failures, which poison the session.
        """
        env = envelope.parse(
            record, session_id=self.session_id, kind=kind, direction=_DIRECTION, max_count=0
        )
        if env.body_length != body_length:
            raise Refusal(Status.BAD_REQUEST, f"{kind.name} body must be {body_length} bytes")
        body = bytearray(body_length)
        envelope.open_into(self._aead, env, memoryview(body))
        self._check_seq(env.seq)
        self.next_seq += 1
        return bytes(body)

    def _check_seq(self, seq: int) -> None:
        """Refusal unless ``seq`` is the next record's: REPLAY below, OUT_OF_ORDER above."""
        if seq != self.next_seq:
            status = Status.REPLAY if seq < self.next_seq else Status.OUT_OF_ORDER
            raise Refusal(status, f"record {seq}, expected {self.next_seq}")

    def _accept(self, env: envelope.Envelope, frames: npt.NDArray[np.intp], *,
                scatter: bool) -> None:
        """The authenticated record's order checks, then its versions and (``scatter``:
        from the scratch buffer) its pages."""
        count = len(frames)
        self._check_seq(env.seq)
        versions = env.entries["version"]
        if not np.array_equal(versions, self.versions[frames] + np.uint64(1)):
            raise Refusal(Status.OUT_OF_ORDER, "a page version does not follow the one held")
        if scatter:
            bitmap = np.frombuffer(self._scratch, np.uint8, bitmap_bytes(count))
            zero = np.unpackbits(bitmap, count=count, bitorder="little").astype(bool)
            kept = count - int(np.count_nonzero(zero))
            self.memory[frames[~zero]] = _pages_of(self._scratch, count)[:kept]
            self.memory[frames[zero]] = 0
        self.versions[frames] = versions
        self.next_seq += 1
