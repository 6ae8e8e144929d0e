"""The batched timeout path: expire many sessions in one fenced transaction.

`SessionService.expire` costs one lock, one transaction and a handful of queries
per session; a sweep that finds 100,000 stale sessions needs something cheaper
that keeps the same rules. Per batch, with the batch's slot locks held:

1. re-read the due rows (the authoritative read, under the locks) in one query that
   also gives each row's slot fence and whether another session waits on its slot;
2. leave to the per-session path every slot with something to do beyond a plain
   timeout — sessions waiting on the slot (promotion), open transfers (cancel
   events), a missing slot row;
3. for the rest: one conditional `UPDATE` per former status (refused unless every
   row is still in that status and past its deadline), one fence bump per slot
   conditioned on the fence value read, and the audit rows (hash-chained exactly
   as a slot transaction does, to the last hash read with the row) and
   `session.timeout` events inserted as multi-row Core inserts — all in one
   transaction that commits or not as a whole.

Everything runs on the unit of work's Core connection (no ORM identity map or
unit-of-work bookkeeping for rows nobody loads as objects), with primary-key lists
rendered inline; at 2,000 sessions a batch the per-row Python cost otherwise
outweighs the database's own work.

A count that does not match (a stale holder slipped in) rolls the batch back and
hands its sessions to the per-session path, which re-checks each under its lock.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, literal_column, select, tuple_, update
from sqlalchemy.orm import aliased

from app.audit.models import OPERATIONS
from app.audit.trail import _digest
from app.events.models import EVENTS
from app.events.outbox import Audience
from app.sessions.enums import SessionStatus, SessionType, TransferStatus
from app.sessions.models import SESSIONS, SLOTS, Session, Slot
from app.sessions.service import SessionService
from app.sessions.slot import SlotKey
from app.sweeps.locks import hold_slots
from app.transfers.models import Transfer

log = logging.getLogger(__name__)
S = SessionStatus
ACTOR = "system:sweep"

_COLUMNS = (
    Session.id, Session.session_id, Session.account_id, Session.shop_id,
    Session.session_type, Session.status, Session.priority, Session.owner_id,
    Session.origin, Session.client_id, Session.deadline_at, Session.holds_slot,
)


class _BatchRefused(Exception):
    """The batch's conditional writes did not all apply; roll back, go one by one."""


@dataclass
class BatchOutcome:
    expired: list[str] = field(default_factory=list)  # session ids timed out in bulk
    one_by_one: list[str] = field(default_factory=list)  # left to SessionService.expire
    busy: list[str] = field(default_factory=list)  # slot lock held by someone else
    not_due: int = 0  # a heartbeat or message moved the deadline meanwhile


@dataclass(frozen=True)
class DueSession:
    """What the sweep's index read gives for one due session."""

    pk: int
    session_id: str
    account_id: str
    shop_id: str


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
            found = [DueSession(*row) for row in db.execute(
                select(Session.id, Session.session_id, Session.account_id, Session.shop_id)
                .where(Session.session_id.in_(list(session_ids)))
            ).all()]
    slot_of = {r.session_id: (r.account_id, r.shop_id) for r in found}
    pk_of = {r.session_id: r.pk for r in found}
    with hold_slots(service.locks, slot_of.values()) as held:
        outcome.busy = [sid for sid, slot in slot_of.items() if slot not in held]
        mine = [sid for sid, slot in slot_of.items() if slot in held]
        if mine:
            try:
                _expire_held(service, [pk_of[sid] for sid in mine], now, outcome)
            except _BatchRefused as exc:
                log.info("bulk timeout batch refused (%s); expiring one by one", exc)
                outcome.expired = []
                outcome.one_by_one = list(mine)
    if outcome.expired:
        try:
            service.hooks.events_written()
        except Exception:  # committed already; the delivery safety net catches up
            log.exception("after-commit hook failed")
    return outcome


# Statements carrying inline id lists differ every batch: keep them out of the
# compiled-statement cache instead of evicting the statements that do repeat.
_UNCACHED = {"compiled_cache": None}


def _pk_in(column: Any, pks: Sequence[int]) -> Any:
    """`column IN (1, 2, …)` rendered inline: primary keys are ints, and a 2,000-item
    list bound one parameter at a time costs more Python than the query itself."""
    listed = ", ".join(str(int(pk)) for pk in pks)
    return column.op("IN")(literal_column(f"({listed})"))


def _expire_held(
    service: SessionService, pks: list[int], now: datetime, outcome: BatchOutcome
) -> None:
    with service.database.unit_of_work() as uow:
        conn = uow.session.connection()
        # One read gives the rows, their slot's fence (NULL: no slot row), through the
        # slot index whether another session waits on the slot, and through the audit
        # index the last row hash each new audit row chains to (no writer of this
        # session's audit rows can run while we hold its slot lock).
        waiter = aliased(Session)
        waiting = (
            select(waiter.id)
            .where(waiter.account_id == Session.account_id, waiter.shop_id == Session.shop_id,
                   waiter.status.in_([S.PENDING, S.PAUSED]), waiter.id != Session.id)
            .correlate(Session)
            .exists()
        )
        ops = OPERATIONS.c
        last_hash = (
            select(ops.row_hash)
            .where(ops.session_pk == Session.id)
            .order_by(ops.id.desc())
            .limit(1)
            .correlate(Session)
            .scalar_subquery()
        )
        rows = conn.execute(
            select(*_COLUMNS, Slot.fence, waiting.label("has_waiters"),
                   last_hash.label("last_hash"))
            .outerjoin(Slot, and_(Slot.account_id == Session.account_id,
                                  Slot.shop_id == Session.shop_id))
            .where(_pk_in(Session.id, pks)),
            execution_options=_UNCACHED,
        ).all()
        due = [
            r for r in rows
            if not S(r.status).is_terminal and r.deadline_at is not None and r.deadline_at <= now
        ]
        outcome.not_due = len(rows) - len(due)
        if not due:
            return
        due_pks = {r.id for r in due}
        fences = {(r.account_id, r.shop_id): r.fence for r in due if r.fence is not None}
        complicated = _slots_with_waiters(conn, due, due_pks) | _slots_with_open_transfers(
            conn, due)
        complicated |= {(r.account_id, r.shop_id) for r in due if r.fence is None}
        one_by_one = [r for r in due if (r.account_id, r.shop_id) in complicated]
        simple = [r for r in due if (r.account_id, r.shop_id) not in complicated]
        outcome.one_by_one = [r.session_id for r in one_by_one]
        if not simple:
            return

        for status in {S(r.status) for r in simple}:
            ids = [r.id for r in simple if r.status == status]
            changed = conn.execute(
                update(SESSIONS)
                .where(_pk_in(SESSIONS.c.id, ids),
                       SESSIONS.c.status == status,
                       SESSIONS.c.deadline_at <= now)
                .values(status=S.TIMEOUT, holds_slot=None, ended_at=now, end_reason="timeout",
                        deadline_at=None),
                execution_options=_UNCACHED,
            ).rowcount
            if changed != len(ids):
                raise _BatchRefused(f"{changed} of {len(ids)} {status} sessions changed")

        _advance_fences(conn, simple, fences, now)
        _write_audit(conn, simple, now)
        conn.execute(insert(EVENTS), [_event_row(r, now) for r in simple])
        uow.commit()
        outcome.expired = [r.session_id for r in simple]


def _slots_with_waiters(conn: Any, due: Sequence[Any], due_pks: set[int]) -> set[SlotKey]:
    """Slots this batch vacates where another session waits (PENDING or PAUSED): freeing
    them means a promotion, which the per-session path does. The read flagged rows whose
    slot has any other waiter; only those flagged rows need a second look, to tell a
    waiter outside the batch from one that is itself being timed out here."""
    flagged = [r for r in due if r.holds_slot and r.has_waiters]
    if not flagged:
        return set()
    vacated = list({(r.account_id, r.shop_id) for r in flagged})
    rows = conn.execute(
        select(Session.id, Session.account_id, Session.shop_id)
        # A two-column IN plus a status list is an index range read on MariaDB and
        # MySQL; a three-column IN is not.
        .where(tuple_(Session.account_id, Session.shop_id).in_(vacated),
               Session.status.in_([S.PENDING, S.PAUSED]))
    ).all()
    return {(r.account_id, r.shop_id) for r in rows if r.id not in due_pks}


def _slots_with_open_transfers(conn: Any, due: Sequence[Any]) -> set[SlotKey]:
    transferred = [r.id for r in due if r.status == S.TRANSFERRED]
    if not transferred:
        return set()
    pks = set(conn.execute(
        select(Transfer.session_pk).where(
            _pk_in(Transfer.session_pk, transferred),
            Transfer.status.in_([TransferStatus.PENDING, TransferStatus.ACCEPTED]),
        ),
        execution_options=_UNCACHED,
    ).scalars())
    return {(r.account_id, r.shop_id) for r in due if r.id in pks}


def _advance_fences(
    conn: Any, sessions: Sequence[Any], fences: dict[SlotKey, int], now: datetime
) -> None:
    """Bump each slot's fence iff it still has the value read under the lock."""
    left = {(r.account_id, r.shop_id) for r in sessions if r.holds_slot}
    slots = SLOTS.c
    for vacated in (True, False):
        keys = [
            (a, s, fences[(a, s)])
            for a, s in sorted({(r.account_id, r.shop_id) for r in sessions})
            if ((a, s) in left) == vacated
        ]
        if not keys:
            continue
        values: dict[str, Any] = {"fence": slots.fence + 1, "updated_at": now}
        if vacated:
            values["occupant_session_id"] = None
        changed = conn.execute(
            update(SLOTS)
            .where(tuple_(slots.account_id, slots.shop_id, slots.fence).in_(keys))
            .values(**values)
        ).rowcount
        if changed != len(keys):
            raise _BatchRefused(f"fence moved on {len(keys) - changed} slots")


def _write_audit(conn: Any, sessions: Sequence[Any], now: datetime) -> None:
    """Append one `timeout` row per session, chained to its last row (read with the
    session as `last_hash`) exactly as a slot transaction chains."""
    timeout = str(S.TIMEOUT)
    rows = []
    for r in sessions:
        status_before = str(r.status)
        details = {"deadline_at": r.deadline_at.isoformat(), "status_before": status_before}
        prev_hash = r.last_hash
        fields = {
            "session_id": r.session_id, "operation": "timeout", "from_status": status_before,
            "to_status": timeout, "actor": ACTOR, "reason": "timeout",
            "details": details, "created_at": now,
        }
        rows.append({
            **fields, "session_pk": r.id, "prev_hash": prev_hash,
            "row_hash": _digest(prev_hash=prev_hash, **fields),
        })
    conn.execute(insert(OPERATIONS), rows)


def _event_row(r: Any, now: datetime) -> dict[str, Any]:
    """The `session.timeout` event exactly as `SlotTx.set_status` writes it."""
    human = SessionType(r.session_type).is_human
    return {
        "type": "session.timeout",
        "session_id": r.session_id,
        "account_id": r.account_id,
        "shop_id": r.shop_id,
        "client_id": r.client_id,
        "audience": Audience.DESK if human else Audience.OWNER,
        "occurred_at": now,
        "data": {
            "session_id": r.session_id, "account_id": r.account_id, "shop_id": r.shop_id,
            "session_type": str(r.session_type), "status": str(S.TIMEOUT),
            "priority": r.priority, "owner_id": r.owner_id, "origin": str(r.origin),
            "previous_status": str(r.status), "reason": "timeout",
        },
    }
