"""The batched timeout path: expire many sessions in one fenced transaction.

`SessionService.expire` costs one lock, one transaction and a handful of queries
per session; a sweep that finds 100,000 stale sessions needs something cheaper
that keeps the same rules. Per batch, with the batch's slot locks held:

1. re-read the due rows (the authoritative read, under the locks) in one query that
   also gives each row's slot fence, whether another session waits on its slot and
   the last audit hash of the session;
2. leave to the per-session path every slot with something to do beyond a plain
   timeout — sessions waiting on the slot (promotion), open transfers (cancel
   events), a missing slot row;
3. for the rest: one conditional `UPDATE` per former status (refused unless every
   row is still in that status and past its deadline), one fence bump per slot
   conditioned on the fence value read, the audit rows (hash-chained exactly as a
   slot transaction does, to the chain head read with the row; the new head is set by
   the status `UPDATE` itself) and the `session.timeout` events — all in one
   transaction that commits or not as a whole.

At 2,000 sessions a batch, Python costs as much as the database: every value read
or sent goes through pymysql's pure-Python parsing and escaping. So the batch runs
on the unit of work's Core connection (no ORM bookkeeping); the events are built
by the database from the session rows (`INSERT … SELECT`: nothing per row crosses
the wire); the read under the lock carries only what the decision needs; and what
the sweep does send (primary keys, ids, hashes, times) is rendered inline when it
is plain text that means the same in every dialect — else bound as usual.

A count that does not match (a stale holder slipped in) rolls the batch back and
hands its sessions to the per-session path, which re-checks each under its lock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    Connection,
    Table,
    and_,
    case,
    func,
    insert,
    literal,
    literal_column,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import OperationalError

from app.audit.models import OPERATIONS
from app.audit.operations import AuditOperation
from app.audit.trail import chain_hash
from app.coordination.slot_locks import SlotKey
from app.db import UTCDateTime, is_retryable_db_error
from app.events.models import EVENTS
from app.events.outbox import Audience
from app.events.types import EventType
from app.sessions.enums import HUMAN_TYPES, SessionStatus
from app.sessions.models import SESSIONS, SLOTS
from app.sessions.service import SessionService
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer

log = logging.getLogger(__name__)
S = SessionStatus
ACTOR = "system:sweep"
REASON = "timeout"


class _BatchRefused(Exception):
    """The batch's conditional writes did not all apply; roll back, go one by one."""


@dataclass
class BatchOutcome:
    expired: list[str] = field(default_factory=list)  # session ids timed out in bulk
    one_by_one: list[str] = field(default_factory=list)  # left to SessionService.expire
    busy: list[str] = field(default_factory=list)  # slot lock held by someone else
    not_due: int = 0  # a heartbeat or message moved the deadline meanwhile


# Rows of a batch are tuples: thousands of them are built per batch, and a frozen
# dataclass costs several times as much to construct.
class DueSession(NamedTuple):
    """What the sweep's index read gives for one due session (all of it immutable)."""

    pk: int
    session_id: str
    account_id: str
    shop_id: str
    deadline_at: datetime | None

    @property
    def slot(self) -> SlotKey:
        return (self.account_id, self.shop_id)


class _Held(NamedTuple):
    """A due session as re-read under its slot lock."""

    due: DueSession
    status: SessionStatus
    deadline_at: datetime | None
    fence: int | None  # None: the slot has no guard row yet
    has_waiters: bool  # some other session of the slot is PENDING or PAUSED
    last_hash: str | None  # the session's audit chain head

    @property
    def holds_slot(self) -> bool:
        return self.status.occupies_slot


def read_due(conn: Connection, session_ids: Sequence[str]) -> list[DueSession]:
    """The primary keys and slots of the given sessions."""
    s = SESSIONS.c
    return [DueSession(*row) for row in conn.execute(
        select(s.id, s.session_id, s.account_id, s.shop_id, s.deadline_at)
        .where(s.session_id.in_(list(session_ids)))
    ).all()]


def expire_batch(
    service: SessionService,
    session_ids: Sequence[str],
    now: datetime,
    *,
    found: Sequence[DueSession] | None = None,
) -> BatchOutcome:
    """Time out the given sessions (all due at `now` when they were found), in bulk where
    safe. `found` spares a lookup when the caller already read the rows' slots."""
    outcome = BatchOutcome()
    if not session_ids:
        return outcome
    if found is None:
        with service.database.read() as db:
            found = read_due(db.connection(), session_ids)
    with service.locks.hold_many(d.slot for d in found) as held:
        outcome.busy = [d.session_id for d in found if d.slot not in held]
        mine = [d for d in found if d.slot in held]
        if mine:
            try:
                _expire_held(service, mine, now, outcome)
            except (_BatchRefused, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                    raise
                # Rolled back as a whole: the per-session path re-checks every one.
                log.info("bulk timeout batch refused (%s); expiring one by one", exc)
                outcome.expired, outcome.not_due = [], 0
                outcome.one_by_one = [d.session_id for d in mine]
    return outcome


# Statements carrying inline values differ every batch: keep them out of the
# compiled-statement cache instead of evicting the statements that do repeat.
_UNCACHED = {"compiled_cache": None}


def _plain(text: str) -> bool:
    """True if `text` reads the same inside '…' in MySQL/MariaDB (with or without
    backslash escapes) and SQLite and holds no parameter marker: no quote, backslash,
    percent sign or unprintable character. Our ids, hashes, ISO times and the small
    JSON documents the sweep writes are such text."""
    return text.isprintable() and not any(c in text for c in "'\\%")


def _inline_rows(conn: Connection, rows: Sequence[Sequence[Any]]) -> str | None:
    """`(v, v, …), (v, v, …)` — a multi-row VALUES list or a tuple IN list — with
    every value inline, or None if some text is not plain (then bind them instead).
    Values are ints, plain text, None, or datetimes (rendered by SQLAlchemy, once)."""
    if not _plain("".join([v for row in rows for v in row if type(v) is str])):
        return None
    others: dict[Any, str] = {}

    def other(value: Any) -> str:
        if value not in others:
            if value is not None and not isinstance(value, datetime):
                raise TypeError(f"cannot inline {type(value).__name__}")
            others[value] = "NULL" if value is None else str(
                literal(value, UTCDateTime()).compile(
                    dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        return others[value]

    return ", ".join([
        "(" + ", ".join([f"'{v}'" if type(v) is str else str(v) if type(v) is int
                         else other(v) for v in row]) + ")"
        for row in rows
    ])


def _pk_in(column: Any, pks: Sequence[int]) -> Any:
    """`column IN (1, 2, …)` rendered inline: primary keys are ints, and a 2,000-item
    list bound one parameter at a time costs more Python than the query itself."""
    listed = ", ".join(str(int(pk)) for pk in pks)
    return column.op("IN")(literal_column(f"({listed})"))


def _expire_held(
    service: SessionService, found: Sequence[DueSession], now: datetime,
    outcome: BatchOutcome,
) -> None:
    with service.database.unit_of_work() as uow:
        conn = uow.session.connection()
        _lock_slot_rows(conn, found)
        held = _read_under_lock(conn, found)
        due = [h for h in held if not h.status.is_terminal
               and h.deadline_at is not None and h.deadline_at <= now]
        outcome.not_due = len(held) - len(due)
        if not due:
            return
        complicated = _slots_with_waiters(conn, due) | _slots_with_open_transfers(conn, due)
        complicated |= {h.due.slot for h in due if h.fence is None}
        simple = [h for h in due if h.due.slot not in complicated]
        outcome.one_by_one = [h.due.session_id for h in due if h.due.slot in complicated]
        if not simple:
            return

        audit = _audit_rows(simple, now)  # made first: their hashes are the new chain heads
        for status in sorted({h.status for h in simple}):
            group = [h for h in simple if h.status == status]
            pks = [h.due.pk for h in group]
            changed = conn.execute(
                update(SESSIONS)
                .where(_pk_in(SESSIONS.c.id, pks),
                       SESSIONS.c.status == status,
                       SESSIONS.c.deadline_at <= now)
                .values(status=S.TIMEOUT, holds_slot=None, ended_at=now, end_reason=REASON,
                        deadline_at=None, audit_head=_heads(conn, audit, pks)),
                execution_options=_UNCACHED,
            ).rowcount
            if changed != len(pks):
                raise _BatchRefused(f"{changed} of {len(pks)} {status} sessions changed")
            _insert_events(conn, pks, status, now)

        _advance_fences(conn, simple, now)
        _insert_audit(conn, audit)
        uow.after_commit(service.hooks.events_written)
        uow.commit()
        outcome.expired = [h.due.session_id for h in simple]


def _lock_slot_rows(conn: Connection, found: Sequence[DueSession]) -> None:
    """Lock the batch's slot rows first, in key order, as every writer of a slot does
    (`app.sessions.slot.SlotFence`): a create joining the line of one of these slots
    (which holds its row shared, without the slot lock) then either commits before
    this read — and is seen as a waiter below — or waits for this commit and finds
    the slot free. No-op on SQLite (no row locks; the embedded default serialises)."""
    if conn.dialect.name == "sqlite":
        return
    slots = sorted({d.slot for d in found})
    conn.execute(
        select(SLOTS.c.fence)
        .where(tuple_(SLOTS.c.account_id, SLOTS.c.shop_id).in_(slots))
        .order_by(SLOTS.c.account_id, SLOTS.c.shop_id)
        .with_for_update(),
        execution_options=_UNCACHED,
    ).all()


def _read_under_lock(conn: Connection, found: Sequence[DueSession]) -> list[_Held]:
    """One read gives the rows' status and deadline, their slot's fence (NULL: no slot
    row), through the slot index whether another session waits on the slot, and
    through the audit index the last row hash each new audit row chains to (no
    writer of this session's audit rows can run while we hold its slot lock)."""
    s = SESSIONS.c
    waiter = SESSIONS.alias("waiter").c
    waiting = (
        select(waiter.id)
        .where(waiter.account_id == s.account_id, waiter.shop_id == s.shop_id,
               waiter.status.in_([S.PENDING, S.PAUSED]), waiter.id != s.id)
        .correlate(SESSIONS)
        .exists()
    )
    ops = OPERATIONS.c
    last_hash = func.coalesce(s.audit_head, (  # the anchored head; else the last row
        select(ops.row_hash)
        .where(ops.session_pk == s.id)
        .order_by(ops.id.desc())
        .limit(1)
        .correlate(SESSIONS)
        .scalar_subquery()
    ))
    by_pk = {d.pk: d for d in found}
    rows = conn.execute(
        select(s.id, s.status, s.deadline_at, SLOTS.c.fence,
               waiting.label("has_waiters"), last_hash.label("last_hash"))
        .select_from(SESSIONS)
        .outerjoin(SLOTS, and_(SLOTS.c.account_id == s.account_id,
                               SLOTS.c.shop_id == s.shop_id))
        .where(_pk_in(s.id, list(by_pk))),
        execution_options=_UNCACHED,
    ).all()
    return [
        _Held(by_pk[pk], S(status), deadline_at, fence, bool(has_waiters), last_hash)
        for pk, status, deadline_at, fence, has_waiters, last_hash in rows
    ]


def _slots_with_waiters(conn: Connection, due: Sequence[_Held]) -> set[SlotKey]:
    """Slots this batch vacates where another session waits (PENDING or PAUSED): freeing
    them means a promotion, which the per-session path does. The read flagged rows whose
    slot has any other waiter; only those flagged rows need a second look, to tell a
    waiter outside the batch from one that is itself being timed out here."""
    flagged = [h for h in due if h.holds_slot and h.has_waiters]
    if not flagged:
        return set()
    due_pks = {h.due.pk for h in due}
    vacated = list({h.due.slot for h in flagged})
    rows = conn.execute(
        select(SESSIONS.c.id, SESSIONS.c.account_id, SESSIONS.c.shop_id)
        # A two-column IN plus a status list is an index range read on MariaDB and
        # MySQL; a three-column IN is not.
        .where(tuple_(SESSIONS.c.account_id, SESSIONS.c.shop_id).in_(vacated),
               SESSIONS.c.status.in_([S.PENDING, S.PAUSED]))
    ).all()
    return {(r.account_id, r.shop_id) for r in rows if r.id not in due_pks}


def _slots_with_open_transfers(conn: Connection, due: Sequence[_Held]) -> set[SlotKey]:
    transferred = [h.due.pk for h in due if h.status == S.TRANSFERRED]
    if not transferred:
        return set()
    pks = set(conn.execute(
        select(Transfer.session_pk).where(
            _pk_in(Transfer.session_pk, transferred),
            Transfer.status.in_([TransferStatus.PENDING, TransferStatus.ACCEPTED]),
        ),
        execution_options=_UNCACHED,
    ).scalars())
    return {h.due.slot for h in due if h.due.pk in pks}


def _insert_events(conn: Connection, pks: Sequence[int], before: SessionStatus,
                   now: datetime) -> None:
    """The `session.timeout` events exactly as `SlotTx.set_status` writes them (the
    session's snapshot plus the previous status and reason), built by the database
    from the session rows just updated."""
    s = SESSIONS.c
    data = func.json_object(
        "session_id", s.session_id, "account_id", s.account_id, "shop_id", s.shop_id,
        "session_type", s.session_type, "status", s.status, "priority", s.priority,
        "owner_id", s.owner_id, "origin", s.origin,
        "previous_status", literal(str(before)), "reason", literal(REASON),
    )
    audience = case((s.session_type.in_(sorted(HUMAN_TYPES)), literal(Audience.DESK)),
                    else_=literal(Audience.OWNER))
    e = EVENTS.c
    conn.execute(
        insert(EVENTS).from_select(
            [e.type, e.session_id, e.account_id, e.shop_id, e.client_id, e.audience,
             e.occurred_at, e.data],
            select(literal(EventType.SESSION_TIMEOUT.value), s.session_id, s.account_id, s.shop_id,
                   s.client_id, audience, literal(now, UTCDateTime()), data)
            .where(_pk_in(s.id, pks))
            .order_by(s.id),
        ),
        execution_options=_UNCACHED,
    )


def _advance_fences(conn: Connection, sessions: Sequence[_Held], now: datetime) -> None:
    """Bump each slot's fence iff it still has the value read under the lock."""
    fence_of = {h.due.slot: h.fence for h in sessions}
    vacated = {h.due.slot for h in sessions if h.holds_slot}
    slots = SLOTS.c
    for leaves in (True, False):
        keys = sorted((a, s, fence_of[(a, s)]) for a, s in fence_of
                      if ((a, s) in vacated) == leaves)
        if not keys:
            continue
        values: dict[str, Any] = {"fence": slots.fence + 1, "updated_at": now}
        if leaves:
            values["occupant_session_id"] = None
        target = tuple_(slots.account_id, slots.shop_id, slots.fence)
        listed = _inline_rows(conn, keys)
        condition = (target.op("IN")(literal_column(f"({listed})")) if listed is not None
                     else target.in_(keys))
        changed = conn.execute(
            update(SLOTS).where(condition).values(**values), execution_options=_UNCACHED
        ).rowcount
        if changed != len(keys):
            raise _BatchRefused(f"fence moved on {len(keys) - changed} slots")


_AUDIT_COLUMNS = ("session_pk", "session_id", "operation", "from_status", "to_status",
                  "actor", "reason", "details", "created_at", "prev_hash", "row_hash")


def _audit_rows(sessions: Sequence[_Held], now: datetime) -> dict[int, tuple[Any, ...]]:
    """One `timeout` row per session (by primary key, in `_AUDIT_COLUMNS` order), chained
    to its head (read with the session as `last_hash`) exactly as a slot transaction
    chains."""
    timeout = str(S.TIMEOUT)
    rows = {}
    for h in sessions:
        before = str(h.status)
        assert h.deadline_at is not None  # only due sessions get here
        details = {"deadline_at": h.deadline_at.isoformat(), "status_before": before}
        row_hash = chain_hash(
            prev_hash=h.last_hash, session_id=h.due.session_id, operation=AuditOperation.TIMEOUT,
            from_status=before, to_status=timeout, actor=ACTOR, reason=REASON,
            details=details, created_at=now,
        )
        rows[h.due.pk] = (h.due.pk, h.due.session_id, "timeout", before, timeout, ACTOR,
                          REASON, json.dumps(details, separators=(",", ":")), now,
                          h.last_hash, row_hash)
    return rows


def _insert_audit(conn: Connection, audit: dict[int, tuple[Any, ...]]) -> None:
    _insert_rows(conn, OPERATIONS, _AUDIT_COLUMNS, list(audit.values()),
                 json_columns={"details"})


def _heads(conn: Connection, audit: dict[int, tuple[Any, ...]], pks: Sequence[int]) -> Any:
    """`CASE id WHEN <pk> THEN '<hash>' … END`: each session's new chain head, set by the
    status UPDATE itself (no statement of its own). Primary keys and hex hashes are
    plain text in every dialect, so they are inline."""
    column = conn.dialect.identifier_preparer.quote(SESSIONS.c.id.name)
    heads = [audit[pk][-1] for pk in pks]
    assert _plain("".join(heads))
    whens = " ".join(f"WHEN {int(pk)} THEN '{head}'" for pk, head in zip(pks, heads,
                                                                        strict=True))
    return literal_column(f"CASE {column} {whens} END")


def _insert_rows(conn: Connection, table: Table, columns: Sequence[str],
                 rows: Sequence[tuple[Any, ...]], *, json_columns: set[str]) -> None:
    """One multi-row INSERT of `rows` (JSON columns given as JSON text): values inline
    when all are plain, else bound."""
    listed = _inline_rows(conn, rows)
    if listed is None:
        conn.execute(insert(table), [
            {name: json.loads(v) if name in json_columns and v is not None else v
             for name, v in zip(columns, row, strict=True)}
            for row in rows
        ])
        return
    preparer = conn.dialect.identifier_preparer
    conn.exec_driver_sql(
        f"INSERT INTO {preparer.format_table(table)} "
        f"({', '.join(preparer.quote(c) for c in columns)}) VALUES {listed}",
        execution_options={"no_parameters": True, **_UNCACHED},
    )
