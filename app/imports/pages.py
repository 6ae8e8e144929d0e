"""A chunk too big for memory, in time-ordered pages (SPEC §4: memory stays flat even
when every row of a huge upload belongs to one slot).

Every row of a slot lands in one chunk, so one slot can make one chunk of millions of
rows. Such a chunk is read as a stream: its validated rows are sorted in runs of a
bounded size, each run written back to the staging table (`import_chunk_parts`, at
sequence numbers above `RUN_SEQ_BASE`, so the split's pieces and the runs never
meet); the runs are then merged into one stream ordered by (slot, time, line) and
cut into pages of one slot each. A page ends where the slot's conversation pauses
for more than the job's gap — where the gap rule starts a new segment anyway — so
grouping page by page is the gap rule's result for the whole slot; only a single
conversation longer than `hard_rows` without such a pause is cut inside (its later
pages then continue the session its first page made). A thread or a reply chain that a
page cut crosses is continued the same way: a later page finds the thread's session by
its `thread_id` and a reply's by its stored parent (only a reply timed before the parent
it names, on an earlier page, falls back to the gap rule).

Memory holds one run while sorting, one piece per run while merging, one page while
storing: none of them grows with the file.
"""

from __future__ import annotations

import heapq
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, select

from app.db import Database
from app.fastsql import core_insert
from app.imports.chunking import unpack_rows
from app.imports.counts import ImportCounts
from app.imports.models import ImportChunkPart
from app.imports.rows import Msg
from app.sessions.enums import SenderRole, TaskType

# Runs live at sequence numbers RUN_SEQ_BASE + (attempt << 26) + (run << 16) + piece:
# a run of one attempt never overwrites another attempt's (two runs of a chunk may
# overlap after a redelivery), and all of it fits a signed 32-bit column.
RUN_SEQ_BASE = 1 << 30
ATTEMPT_SLOTS = 16
MAX_RUNS = 1 << 10
MAX_RUN_PIECES = 1 << 16

SortKey = tuple[str, str, datetime, int]


def sort_key(msg: Msg) -> SortKey:
    return (msg.account_id, msg.shop_id, msg.sent_at, msg.line)


def msg_chars(msg: Msg) -> int:
    """About what a row holds in memory, in characters (its content dominates)."""
    return len(msg.content) + 160


@dataclass(frozen=True)
class PageLimits:
    """The bounds of a chunk read as a stream (defaults sized for a worker of ~100 MB)."""

    run_rows: int = 10_000  # a chunk with more valid rows than one run is read in pages
    run_chars: int = 16 << 20
    page_rows: int = 2_000  # a page ends at the next pause of its slot past these ...
    page_chars: int = 4 << 20
    hard_rows: int = 10_000  # ... and at these, pause or not
    hard_chars: int = 16 << 20
    piece_rows: int = 500  # a run is written in pieces of this many rows
    piece_chars: int = 1 << 20
    fan_in: int = 32  # runs merged at once
    read_rows: int = 5_000  # staged rows fetched per query


class RowErrors:
    """Invalid rows of a chunk: all counted, the first MAX (lowest lines) kept."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.invalid = 0
        self._heap: list[tuple[int, int, str]] = []  # (-line, -order, error): a max-heap

    def add(self, line: int, error: str) -> None:
        self.invalid += 1
        item = (-line, -self.invalid, error)
        if len(self._heap) < self.keep:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def counts(self) -> ImportCounts:
        errors = [{"line": -line, "error": error}
                  for line, _, error in sorted(self._heap, reverse=True)]
        return ImportCounts(invalid=self.invalid, errors=errors)


def read_staged(database: Database, job_pk: int, bucket: int, *, rows: int,
                group_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows the split staged for a chunk of `rows` rows, in staging order. A usual
    chunk comes in one query; a bigger one in groups of pieces holding about
    `group_rows` rows (their sizes read first, without their payloads), so memory holds
    a bounded slice of a chunk however big it is. Pieces are decompressed one at a
    time."""
    part = ImportChunkPart
    staged = (part.job_pk == job_pk, part.bucket == bucket, part.seq < RUN_SEQ_BASE)
    if rows <= group_rows:
        with database.read() as db:
            payloads = list(db.execute(select(part.payload).where(*staged)
                                       .order_by(part.seq)).scalars())
        for payload in payloads:
            yield from unpack_rows(payload)
        return
    with database.read() as db:
        sizes = db.execute(select(part.seq, part.row_count).where(*staged)
                           .order_by(part.seq)).all()
    group: list[int] = []
    in_group = 0
    for index, (seq, count) in enumerate(sizes):
        group.append(seq)
        in_group += count
        if in_group < group_rows and index + 1 < len(sizes):
            continue
        with database.read() as db:
            payloads = list(db.execute(select(part.payload).where(
                *staged, part.seq >= group[0], part.seq <= group[-1]).order_by(part.seq)
            ).scalars())
        group, in_group = [], 0
        for payload in payloads:
            yield from unpack_rows(payload)


def pack_msgs(msgs: Sequence[Msg]) -> bytes:
    rows = [[m.line, m.message_id, m.account_id, m.shop_id, str(m.sender_role), m.sender_id,
             m.content, m.message_type, m.sent_at.isoformat(), m.session_id,
             m.task_type.value if m.task_type else None, m.reply_to, m.thread_id]
            for m in msgs]
    return zlib.compress(json.dumps(rows, ensure_ascii=False, separators=(",", ":"))
                         .encode("utf-8"), 1)


def unpack_msgs(payload: bytes) -> list[Msg]:
    roles = {role.value: role for role in SenderRole}
    return [
        Msg(line=line, message_id=message_id, account_id=account, shop_id=shop,
            sender_role=roles[role], sender_id=sender_id, content=content,
            message_type=message_type, sent_at=datetime.fromisoformat(sent_at),
            session_id=session_id, task_type=TaskType(task) if task else None,
            reply_to=threading[0] if threading else None,
            thread_id=threading[1] if threading else None)
        for (line, message_id, account, shop, role, sender_id, content, message_type,
             sent_at, session_id, task, *threading) in json.loads(zlib.decompress(payload))
    ]


@dataclass
class SortedRuns:
    """Sorted runs of one attempt at one chunk, kept in the staging table."""

    database: Database
    job_pk: int
    bucket: int
    attempt: int
    limits: PageLimits
    pieces: dict[int, int] = field(default_factory=dict)  # run → pieces written
    _next_run: int = field(default=0, init=False)

    @property
    def base(self) -> int:
        return RUN_SEQ_BASE + ((self.attempt % ATTEMPT_SLOTS) << 26)

    def _seq(self, run: int, piece: int) -> int:
        if run >= MAX_RUNS or piece >= MAX_RUN_PIECES:
            raise RuntimeError(f"chunk too large to sort: run {run}, piece {piece}")
        return self.base + (run << 16) + piece

    def add_run(self, msgs: list[Msg]) -> None:
        """Sort `msgs` (in place) and keep them as a new run."""
        msgs.sort(key=sort_key)
        self._write(iter(msgs))

    def _write(self, msgs: Iterator[Msg]) -> int:
        run = self._next_run
        self._next_run += 1
        self.pieces[run] = 0
        batch: list[dict[str, Any]] = []
        piece: list[Msg] = []
        chars = 0

        def close_piece() -> None:
            nonlocal piece, chars
            number = self.pieces[run]
            batch.append({"job_pk": self.job_pk, "bucket": self.bucket,
                          "seq": self._seq(run, number), "row_count": len(piece),
                          "payload": pack_msgs(piece)})
            self.pieces[run] = number + 1
            piece, chars = [], 0
            if len(batch) >= 16:
                self._insert(batch)

        for msg in msgs:
            piece.append(msg)
            chars += msg_chars(msg)
            if len(piece) >= self.limits.piece_rows or chars >= self.limits.piece_chars:
                close_piece()
        if piece:
            close_piece()
        self._insert(batch)
        return run

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        if batch:
            with self.database.unit_of_work() as uow:
                core_insert(uow.session, ImportChunkPart, batch)
                uow.commit()
            batch.clear()

    def _read(self, run: int) -> Iterator[Msg]:
        part = ImportChunkPart
        for number in range(self.pieces[run]):
            with self.database.read() as db:
                payload = db.execute(select(part.payload).where(
                    part.job_pk == self.job_pk, part.bucket == self.bucket,
                    part.seq == self._seq(run, number))).scalar_one()
            yield from unpack_msgs(payload)

    def _drop(self, runs: Sequence[int]) -> None:
        part = ImportChunkPart
        with self.database.unit_of_work() as uow:
            for run in runs:
                low = self._seq(run, 0)
                uow.session.execute(delete(part).where(
                    part.job_pk == self.job_pk, part.bucket == self.bucket,
                    and_(part.seq >= low, part.seq < low + MAX_RUN_PIECES)))
                self.pieces.pop(run, None)
            uow.commit()

    def merged(self) -> Iterator[Msg]:
        """Every row of every run, ordered by `sort_key`; at most `fan_in` runs are read
        at once (more are first merged into longer runs)."""
        runs = sorted(self.pieces)
        while len(runs) > self.limits.fan_in:
            first, runs = runs[:self.limits.fan_in], runs[self.limits.fan_in:]
            runs.append(self._write(heapq.merge(*(self._read(r) for r in first),
                                                key=sort_key)))
            self._drop(first)
        return heapq.merge(*(self._read(r) for r in runs), key=sort_key)

    def discard(self) -> None:
        """Delete this attempt's runs (the job's end deletes whatever is left anyway)."""
        part = ImportChunkPart
        with self.database.unit_of_work() as uow:
            uow.session.execute(delete(part).where(
                part.job_pk == self.job_pk, part.bucket == self.bucket,
                part.seq >= self.base, part.seq < self.base + (1 << 26)))
            uow.commit()
        self.pieces.clear()


def slot_pages(stream: Iterator[Msg], gap: timedelta, limits: PageLimits
               ) -> Iterator[list[Msg]]:
    """Cut a (slot, time)-ordered stream into pages of one slot each: a page ends at
    the first pause longer than `gap` once it holds `page_rows`/`page_chars`, and at
    `hard_rows`/`hard_chars` whatever comes."""
    page: list[Msg] = []
    chars = 0
    last: Msg | None = None
    for msg in stream:
        if last is not None:
            other_slot = msg.account_id != last.account_id or msg.shop_id != last.shop_id
            full = len(page) >= limits.page_rows or chars >= limits.page_chars
            if (other_slot or (full and msg.sent_at - last.sent_at > gap)
                    or len(page) >= limits.hard_rows or chars >= limits.hard_chars):
                yield page
                page, chars = [], 0
        page.append(msg)
        chars += msg_chars(msg)
        last = msg
    if page:
        yield page
