"""Grouping imported messages into sessions: SPEC §4 steps 2–7, one slot at a time.

For every slot (account_id, shop_id) of a batch:

1. drop messages already stored or repeated in the batch (by message_id),
2. order by time and segment (`app.imports.segmenting`, a pipeline of replaceable
   steps: threads, reply chains, the gap rule at the job's `session_gap`, the LLM
   review's verdicts — asked for before the transaction, `review_boundaries`); what the
   threading fields point to in storage is looked up first (`stored_links`),
3. plan each segment (`plan_slot`, pure): attach it to the session it continues (by
   session_id, thread or reply), else to an existing session it overlaps or continues
   within the gap (open sessions only, for a threaded one), or create a session
   (`origin=import`, recording `started_by` and `thread_id`,
   typed by our side's first sender; a robot→staff segment is a hand-off with a
   transfer record, trigger `history`), or — staff talking on a slot whose robot
   session is ACTIVE — the seed's "人工自由" case 1,
4. apply the plan. Slots whose plan only touches the past (closed segments,
   ended sessions) are written in bulk in the caller's transaction, without
   events. Slots with anything live (a segment that ended less than SESSION_GAP
   ago, an open session, a conflict) go through `SessionService.run_on_slot`, so
   the slot lock, the fence and the §3.5 rules apply exactly as for a request.

Every session touched gets an audit row by `system:import`.

The rows of a batch are written by executemany in database batches of at most
`BatchContext.batch_rows` rows each — BATCH_SIZE, the seed's 批处理大小 (SPEC §10:
it bounds one database batch) — whatever the number of rows one worker task takes
(`app.imports.chunking.TASK_ROWS`), which is the project's choice.

This module is the entry point (`import_messages`, and `import_rows` for the Python
API); the steps live beside it: `dedup` (1, and the stored reads), `segmenting` and
`planning` (2, 3), `writing` (the bulk path of 4) and `live` (the slot-lock path).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as DbSession

from app.db import UnitOfWork, is_retryable_db_error, utcnow
from app.imports.counts import ImportCounts, combined
from app.imports.dedup import (
    ID_BATCH,
    TimeWindow,
    fresh_messages,
    known_sessions,
    merged_since_read,
    resolve_session_slots,
    stored_links,
)
from app.imports.live import apply_live_slot
from app.imports.planning import Attach, Known, NewSession, Step, needs_slot_lock, plan_slot
from app.imports.review import CONTEXT_MESSAGES as REVIEW_CONTEXT
from app.imports.review import BoundaryReviewer, ReviewOutcome
from app.imports.rows import ChatRow, Msg, Slot, check_msg
from app.imports.segmenting import (
    NO_LINKS,
    Boundary,
    GroupingOptions,
    Segment,
    Segmenter,
    review_candidates,
    segment_slot,
    split_at_gaps,
)
from app.imports.writing import Writer
from app.sessions.models import Session

log = logging.getLogger(__name__)

ACTOR = "system:import"
BULK_ATTEMPTS = 5


@dataclass
class BatchContext:
    """Where a batch comes from; the job pipeline passes its chunk's markers."""

    job_id: str | None = None
    chunk_pk: int | None = None
    segmenter: Segmenter = split_at_gaps  # the gap rule's step
    # The upload's grouping options (None: SESSION_GAP, grouping=auto, no review)
    options: GroupingOptions | None = None
    # Set when the upload asked for review (and an endpoint is configured)
    reviewer: BoundaryReviewer | None = None
    # Rows per INSERT (BATCH_SIZE: one database batch); None: no bound.
    batch_rows: int | None = None
    # Runs inside the bulk transaction before its commit (the chunk's 'done' marker).
    before_commit: Callable[[DbSession, ImportCounts], None] | None = None
    # Test hook: called after the bulk rows are written, before the commit.
    after_write: Callable[[], None] | None = None
    live_marks: Callable[[DbSession], dict[Slot, ImportCounts]] | None = None
    mark_slot: Callable[[DbSession, Slot, ImportCounts], None] | None = None


def import_rows(
    runtime: Any,
    rows: Sequence[tuple[int, ChatRow]],
    *,
    actor: str = ACTOR,
) -> ImportCounts:
    """Group validated rows into sessions and store them (the Python API's door)."""
    counts = ImportCounts()
    msgs: list[Msg] = []
    resolved = resolve_session_slots(runtime, [row.session_id for _, row in rows
                                               if row.session_id and not row.account_id])
    for line, row in rows:
        msg = Msg.from_row(line, row)
        if msg.session_id and (not msg.account_id or not msg.shop_id):
            slot = resolved.get(msg.session_id)
            if slot:
                msg.account_id, msg.shop_id = slot
        checked = check_msg(msg)
        if isinstance(checked, str):
            counts.error(line, checked)
        else:
            msgs.append(checked)
    counts.add(import_messages(runtime, msgs, actor=actor, context=BatchContext(
        batch_rows=runtime.settings.batch_size)))
    return counts




def review_boundaries(runtime: Any, slots: dict[Slot, list[Msg]], options: GroupingOptions,
                      reviewer: BoundaryReviewer, *, segmenter: Segmenter = split_at_gaps
                      ) -> ReviewOutcome:
    """SPEC §4d, before the chunk's transaction: segment the slots' new rows as the
    transaction will (read-only: stored rows dropped, stored links looked up), and ask
    the reviewer about the ambiguous gap-rule boundaries. A row that a concurrent writer
    stores meanwhile only makes a verdict unused."""
    with runtime.database.read() as db:
        fresh = fresh_messages(db, slots, ImportCounts())
        links = stored_links(db, fresh, options)
        named = sorted({m.session_id for msgs in fresh.values() for m in msgs
                        if m.session_id})
        pinned_to: dict[str, Slot] = {}
        for i in range(0, len(named), ID_BATCH):
            for sid, account, shop in db.execute(
                    select(Session.session_id, Session.account_id, Session.shop_id)
                    .where(Session.session_id.in_(named[i:i + ID_BATCH]))):
                pinned_to[sid] = (account, shop)
    boundaries: list[Boundary] = []
    for slot, msgs in fresh.items():
        pinned: dict[str, list[Msg]] = defaultdict(list)
        loose: list[Msg] = []
        for msg in msgs:
            if msg.session_id and pinned_to.get(msg.session_id) == slot:
                pinned[msg.session_id].append(msg)
            else:
                loose.append(msg)
        segments = segment_slot(loose, options, placed=[Segment(m, None) for m in
                                                        pinned.values()],
                                stored=links.get(slot, NO_LINKS), split=segmenter)
        boundaries.extend(review_candidates(segments, min_gap=reviewer.min_gap,
                                            max_gap=reviewer.max_gap,
                                            context=REVIEW_CONTEXT))
    return reviewer.review(boundaries)


class SlotsBecameLive(Exception):
    """Raised inside the bulk transaction: these slots need the slot lock instead."""

    def __init__(self, slots: list[Slot]) -> None:
        super().__init__(f"{len(slots)} slots need the slot lock")
        self.slots = slots


def import_messages(
    runtime: Any, msgs: Sequence[Msg], *, actor: str, context: BatchContext
) -> ImportCounts:
    """Steps 2–7 for validated messages of any number of slots (all of each slot's rows).

    Everything that only touches the past is written in one bulk transaction; a slot
    with anything live is taken out of it and applied in its own slot transaction
    (`run_on_slot`, with a mark when a chunk is given). The bulk transaction is
    retried on a duplicate key or a deadlock caused by a concurrent writer. With review
    on, the review's verdicts are asked for first, outside any transaction."""
    options = context.options or GroupingOptions(session_gap=runtime.settings.session_gap)
    by_slot: dict[Slot, list[Msg]] = defaultdict(list)
    for msg in msgs:
        by_slot[(msg.account_id, msg.shop_id)].append(msg)
    total = ImportCounts()
    if context.live_marks:
        with runtime.database.read() as db:
            marks = context.live_marks(db)
        for slot, counts in marks.items():
            if slot in by_slot:
                total.add(counts)
                del by_slot[slot]
    verdicts: dict[str, bool] = {}
    if context.reviewer is not None and by_slot:
        outcome = review_boundaries(runtime, by_slot, options, context.reviewer,
                                    segmenter=context.segmenter)
        verdicts = outcome.verdicts
        total.boundaries_reviewed += outcome.reviewed
        total.boundaries_merged += outcome.merged

    last_error: Exception | None = None
    attempt = 0
    while attempt < BULK_ATTEMPTS:
        try:
            with runtime.database.unit_of_work() as uow:
                # A first attempt probes for stored rows; a retry after a duplicate
                # key (or any other refusal) looks every message id up.
                counts = _bulk(uow, by_slot, actor, context, options, verdicts,
                               probe=attempt == 0)
                if context.after_write:
                    context.after_write()
                if context.before_commit:
                    context.before_commit(uow.session, combined(total, counts))
                uow.commit()
            total.add(counts)
            return total
        except SlotsBecameLive as live:
            for slot in live.slots:
                total.add(_run_live_slot(runtime, slot, by_slot.pop(slot), actor, context,
                                         options, verdicts))
        except (IntegrityError, OperationalError) as exc:
            if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                raise
            last_error = exc
            attempt += 1
            log.info("import batch retried after %s (attempt %d)", type(exc).__name__, attempt)
    assert last_error is not None
    raise last_error


def _bulk(uow: UnitOfWork, slots: dict[Slot, list[Msg]], actor: str,
          context: BatchContext, options: GroupingOptions, verdicts: Mapping[str, bool], *,
          probe: bool) -> ImportCounts:
    db = uow.session
    counts = ImportCounts()
    gap = options.gap
    fresh = fresh_messages(db, slots, counts, probe=probe)
    links = stored_links(db, fresh, options)
    known = known_sessions(db, fresh, window=TimeWindow.around(
        (m for msgs in fresh.values() for m in msgs), gap))
    now = utcnow()
    writer = Writer(db, now=now, actor=actor, job_id=context.job_id, batch=context.batch_rows)
    live: list[Slot] = []
    plans: list[list[Step]] = []
    for slot, msgs in fresh.items():
        steps = plan_slot(msgs, [Known.of(s) for s in known.get(slot, [])], now=now,
                          options=options, segmenter=context.segmenter,
                          stored=links.get(slot, NO_LINKS), verdicts=verdicts)
        if needs_slot_lock(steps):
            live.append(slot)
        plans.append(steps)
    if live:
        raise SlotsBecameLive(live)
    for steps in plans:
        for step in steps:
            if isinstance(step, NewSession):
                writer.closed_session(step)
            elif isinstance(step, Attach):
                writer.attach_closed(step.target, step.messages)
    merged = merged_since_read(db, [step.target.pk for steps in plans for step in steps
                                    if isinstance(step, Attach)])
    if merged:  # an operator merged a target away since the plan read it: redo those slots
        raise SlotsBecameLive(merged)  # under the slot lock, which corrections hold (§11)
    writer.flush()
    counts.add(writer.counts)
    return counts


def _run_live_slot(runtime: Any, slot: Slot, msgs: list[Msg], actor: str,
                   context: BatchContext, options: GroupingOptions,
                   verdicts: Mapping[str, bool]) -> ImportCounts:
    gap = options.gap

    def work(tx: Any) -> ImportCounts:
        counts = ImportCounts()
        if context.live_marks:
            marks = context.live_marks(tx.db)
            if slot in marks:
                return marks[slot]
        fresh = fresh_messages(tx.db, {slot: msgs}, counts)
        window = TimeWindow.around(fresh.get(slot, []), gap)
        sessions = [Known.of(s) for s in known_sessions(tx.db, [slot], window=window)
                    .get(slot, [])]
        links = stored_links(tx.db, fresh, options)
        steps = plan_slot(fresh.get(slot, []), sessions, now=tx.now, options=options,
                          segmenter=context.segmenter, stored=links.get(slot, NO_LINKS),
                          verdicts=verdicts)
        apply_live_slot(tx, steps, job_id=context.job_id, counts=counts,
                        batch=context.batch_rows)
        if context.mark_slot:
            context.mark_slot(tx.db, slot, counts)
        return counts

    return runtime.sessions.run_on_slot(slot[0], slot[1], actor, work)
