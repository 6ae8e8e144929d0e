"""A chunk too big for memory (one slot with a huge history) is stored in time-ordered
pages: the result is the one-transaction result, a crash between pages loses and
doubles nothing, and memory does not grow with the slot."""

from __future__ import annotations

import io
import random
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db import utcnow
from app.imports.lifecycle import ImportJobView
from app.imports.models import ImportChunkPart, ImportSlotMark
from app.imports.pages import RUN_SEQ_BASE, PageLimits, RowErrors
from app.imports.service import ImportService
from app.transfers.models import Transfer
from tests.imports.helpers import as_ndjson, message_count, row, sessions_of, staged_left

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
SMALL = PageLimits(run_rows=50, run_chars=1 << 20, page_rows=20, page_chars=1 << 20,
                   hard_rows=60, hard_chars=4 << 20, piece_rows=7, piece_chars=1 << 16,
                   fan_in=3, read_rows=40)


def one_slot_history(account: str, n: int, *, seed: int = 7, live_tail: int = 0,
                     now: datetime | None = None) -> list[dict[str, Any]]:
    """`n` messages of one slot, a pause of 45 min now and then, hand-offs to staff,
    repeated rows and bad rows, in shuffled order; then `live_tail` messages of the last
    few minutes (a conversation still going on)."""
    rnd = random.Random(seed)
    rows = []
    at = T0
    for i in range(n):
        at += timedelta(minutes=rnd.choice([1, 1, 2, 5, 45]))
        role = rnd.choice(["counterpart", "counterpart", "robot", "human"])
        rows.append(row("shop-big", role, at, f"message {i}", account=account,
                        sender_id=f"{role}-{i % 3}"))
    now = now or utcnow()
    for i in range(live_tail):
        rows.append(row("shop-big", "counterpart" if i % 2 else "robot",
                        now - timedelta(minutes=live_tail - i), f"live {i}", account=account))
    rows += rnd.sample(rows, 12)  # duplicates
    rows += [row("shop-big", "robot", T0, "bad", account=account, sent_at="not a time"),
             row("shop-big", "robot", T0, "bad", account=account, sent_at=1e300)]
    rnd.shuffle(rows)
    rows.append(row("shop-small", "robot", T0, "another slot", account=account))
    return rows


def import_with(runtime: Any, rows: list[dict[str, Any]], limits: PageLimits | None,
                **kw: Any) -> ImportJobView:
    service = ImportService(runtime, page_limits=limits, task_rows=10_000)  # one chunk
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
    for pk in service.prepare(job.job_id).chunk_pks:
        service.process_chunk(pk, **kw)
    return service.finish(job.job_id)


def shape(runtime: Any, account: str) -> list[tuple[Any, ...]]:
    with runtime.database.read() as db:
        handed = set(db.execute(select(Transfer.session_pk)).scalars())
    return [(s.shop_id, s.session_type, s.status, s.message_count, s.robot_message_count,
             s.human_message_count, s.counterpart_message_count, s.first_message_at,
             s.last_message_at, s.unanswered, s.id in handed)
            for s in sessions_of(runtime) if s.account_id == account]


def progress_pages(runtime: Any) -> int:
    with runtime.database.read() as db:
        marks = db.execute(select(ImportSlotMark.shop_id)
                           .where(ImportSlotMark.account_id == "")).scalars().all()
    return sum(int(m) for m in marks)


@pytest.mark.parametrize("live_tail", [0, 6], ids=["history", "live-tail"])
def test_pages_give_exactly_what_one_transaction_gives(runtime, live_tail):
    now = utcnow()
    paged = import_with(runtime, one_slot_history("paged", 400, live_tail=live_tail, now=now),
                        SMALL)
    pages = progress_pages(runtime)
    assert pages > 10  # the paged path ran
    whole = import_with(runtime, one_slot_history("whole", 400, live_tail=live_tail, now=now),
                        None)
    assert progress_pages(runtime) == pages  # and the default one did not page this chunk
    counts = ("status", "total_rows", "processed", "inserted", "duplicates", "invalid",
              "sessions_created", "sessions_updated", "conflicts")
    assert [getattr(paged, c) for c in counts] == [getattr(whole, c) for c in counts]
    assert paged.invalid == 2 and paged.duplicates == 12
    assert [(e.line, e.error) for e in paged.errors] == [(e.line, e.error) for e in whole.errors]
    assert shape(runtime, "paged") == shape(runtime, "whole")
    assert sum(1 for s in shape(runtime, "paged") if s[-1]) > 0  # hand-offs were recorded
    for job in (paged, whole):
        assert staged_left(runtime, job.job_id) == (0, 0)


def test_a_conversation_longer_than_a_page_continues_its_session(runtime):
    rows = [row("shop-long", "robot" if i % 2 else "counterpart", T0 + timedelta(minutes=i),
                f"m{i}", account=acc) for acc in ("paged", "whole") for i in range(200)]
    paged = import_with(runtime, [r for r in rows if r["account_id"] == "paged"], SMALL)
    whole = import_with(runtime, [r for r in rows if r["account_id"] == "whole"], None)
    assert (paged.inserted, whole.inserted) == (200, 200)
    assert shape(runtime, "paged") == shape(runtime, "whole")
    assert [s[3] for s in shape(runtime, "paged")] == [200]  # one session of 200 messages


def test_a_crash_between_pages_loses_and_doubles_nothing(runtime):
    rows = one_slot_history("acc", 300)
    calls = {"n": 0}

    def crash_on_the_fifth_page() -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("worker died between pages")

    service = ImportService(runtime, page_limits=SMALL, task_rows=10_000)
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
    (chunk_pk,) = service.prepare(job.job_id).chunk_pks
    with pytest.raises(RuntimeError):
        service.process_chunk(chunk_pk, after_write=crash_on_the_fifth_page)
    stored_before = message_count(runtime)
    assert 0 < stored_before < 300 and progress_pages(runtime) == 4
    counts = service.process_chunk(chunk_pk)
    assert counts is not None
    view = service.finish(job.job_id)
    assert (view.inserted, view.duplicates, view.invalid) == (301, 12, 2)  # 300 + the small slot
    assert message_count(runtime) == 301
    assert service.process_chunk(chunk_pk) is None  # done is done
    with runtime.database.read() as db:  # the sorted runs of both attempts are gone
        assert db.execute(select(func.count()).select_from(ImportChunkPart)
                          .where(ImportChunkPart.seq >= RUN_SEQ_BASE)).scalar_one() == 0


def test_runs_are_merged_in_several_rounds_when_there_are_many(runtime):
    limits = PageLimits(run_rows=10, page_rows=15, hard_rows=40, piece_rows=3, fan_in=2)
    job = import_with(runtime, one_slot_history("acc", 150), limits)
    whole = import_with(runtime, one_slot_history("ref", 150), None)
    assert (job.inserted, job.duplicates, job.sessions_created) == (
        whole.inserted, whole.duplicates, whole.sessions_created)


def peak_of(runtime: Any, rows: list[dict[str, Any]], limits: PageLimits | None) -> int:
    service = ImportService(runtime, page_limits=limits, task_rows=100_000)
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
    (chunk_pk,) = service.prepare(job.job_id).chunk_pks
    tracemalloc.start()
    try:
        service.process_chunk(chunk_pk)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        service.finish(job.job_id)


@pytest.mark.timeout(600)
def test_memory_does_not_grow_with_a_huge_slot(runtime):
    limits = PageLimits(run_rows=500, page_rows=150, hard_rows=600, piece_rows=100, fan_in=4)

    def history(account: str, n: int) -> list[dict[str, Any]]:
        return [row("shop", "robot" if i % 3 else "counterpart",
                    T0 + timedelta(minutes=i * (40 if i % 50 == 0 else 1)),
                    f"message number {i} " * 4, account=account) for i in range(n)]

    small = peak_of(runtime, history("a", 2_000), limits)
    large = peak_of(runtime, history("b", 8_000), limits)
    at_once = peak_of(runtime, history("c", 8_000), None)
    assert large < small * 1.5 + (2 << 20), (small, large)
    assert at_once > large * 2, (at_once, large)  # the bound is what keeps it flat


def test_row_errors_keep_the_lowest_lines_and_count_them_all():
    errors = RowErrors(3)
    for line in [9, 4, 7, 1, 8, 2]:
        errors.add(line, f"bad {line}")
    counts = errors.counts()
    assert counts.invalid == 6
    assert counts.errors == [{"line": 1, "error": "bad 1"}, {"line": 2, "error": "bad 2"},
                             {"line": 4, "error": "bad 4"}]
