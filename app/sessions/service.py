"""The session service: every rule of SPEC §3, behind one lock-and-fence discipline.

Each public method runs one *slot transaction*: take the slot lock, open a unit
of work, read the slot's fence, apply the change (state machine, conflicts,
promotion, audit rows, outbox events), advance the fence, commit. A stale lock
holder fails at the fence or on the unique occupant key and the whole unit is
retried from a fresh read. The service imports neither Flask nor Celery; HTTP
views, CLI commands, Celery tasks and `AutoSessionManager` are adapters over it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import and_, bindparam, case, func, insert, inspect, or_, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import make_transient_to_detached

from app.audit.models import OPERATIONS
from app.audit.trail import last_hash, operation_values
from app.config import Settings
from app.db import Database, UnitOfWork, is_retryable_db_error, one_of, utcnow
from app.errors import (
    AlreadyAccepted,
    Conflict,
    FenceRejected,
    InvalidTransition,
    NotAssignee,
    NotFound,
    ServiceUnavailable,
    SlotOccupied,
)
from app.events.models import EVENTS
from app.events.outbox import Audience, event_values
from app.fastsql import Prepared
from app.ids import new_id
from app.messages.models import Message
from app.sessions import rules
from app.sessions.activity import (
    Control,
    ControlledIf,
    LiveMessage,
    MessageOutcome,
    SessionActivity,
    deadline_after,
)
from app.sessions.enums import (
    Origin,
    PauseCause,
    SessionStatus,
    SessionType,
    TransferStatus,
)
from app.sessions.models import SESSIONS, Session
from app.sessions.schemas import (
    CreateOutcome,
    HandBackOutcome,
    HandBackRequest,
    SessionRequest,
    SessionView,
    TransferRequest,
    TransferView,
)
from app.sessions.slot import BusySlots, SlotFence, SlotLocks, wait_a_little
from app.transfers.models import Transfer
from app.transfers.routing import choose_agent

log = logging.getLogger(__name__)

T = TypeVar("T")
Guard = Callable[[Session], None]
MAX_ATTEMPTS = 6
HISTORY_SNAPSHOT = 50
S = SessionStatus
UNREAD: object = object()
# Built once (every slot transaction runs them); rows are passed at execution.
_INSERT_OPERATIONS = Prepared(insert(OPERATIONS), values_from_params=True)
_INSERT_EVENTS = Prepared(insert(EVENTS), values_from_params=True)
_INSERT_SESSION = Prepared(insert(SESSIONS), values_from_params=True)
_SESSION_COLUMNS = tuple(
    attr.key for attr in inspect(Session).column_attrs if attr.key != "id"
)
_SESSION_DEFAULTS = {
    column.key: column.default.arg  # type: ignore[attr-defined]
    for column in SESSIONS.columns
    if column.default is not None and column.default.is_scalar
}


class NeedsTheSlot(Exception):  # noqa: N818 - control flow inside the service
    """Raised inside a shared slot transaction (a request joining the line) by the first
    step that would change the slot: the transaction is rolled back and the operation
    runs again as a slot transaction, under the slot lock."""


def _count_ahead() -> Any:
    """The statement of `SlotTx.position_of_newest`, built once: the waiting sessions
    (owner-paused ones excluded) of the slot that rank better than or equal to a request
    of class (:robot, :priority, :type_rank), the request itself (:session_pk) not
    counted."""
    c = SESSIONS.c
    rank = case({str(t): r for t, r in rules.TYPE_RANK.items()}, value=c.session_type)
    robot = case((rank >= rules.TYPE_RANK[SessionType.AUTO_BARGAIN], 1), else_=0)
    mine: Any = bindparam("robot")
    return select(func.count()).where(
        c.account_id == bindparam("account_id"),
        c.shop_id == bindparam("shop_id"),
        one_of(c.status, [str(S.PENDING), str(S.PAUSED)]),
        or_(c.pause_cause.is_(None), c.pause_cause != str(PauseCause.OWNER)),
        c.id != bindparam("session_pk"),
        or_(robot < mine, and_(robot == mine, or_(
            c.priority < bindparam("priority"),
            and_(c.priority == bindparam("priority"), rank <= bindparam("type_rank"))))),
    )


_COUNT_AHEAD = Prepared(_count_ahead())


@dataclass
class ServiceHooks:
    """After-commit notifications for the task layer (delivery, detection).

    Defaults do nothing; the composition root (`app.bootstrap`) wires them to the
    dispatcher: Celery tasks, or in-process calls."""

    events_written: Callable[[], None] = lambda: None
    counterpart_messages: Callable[[list[str]], None] = lambda session_ids: None


class SlotTx:
    """One slot transaction: the database session, the fence, the time and the actor.

    Audit rows and events are collected as the work goes and written at the end in
    one multi-row INSERT each (`write_records`, just before the fence), in the order
    they were made; nothing inside a slot transaction reads them back."""

    def __init__(
        self,
        service: SessionService,
        uow: UnitOfWork,
        account_id: str,
        shop_id: str,
        actor: str,
        *,
        trust_slot_row: bool = True,
        shared: bool = False,
    ) -> None:
        self.service = service
        self.uow = uow
        self.db: DbSession = uow.session
        self.account_id = account_id
        self.shop_id = shop_id
        self.actor = actor
        # shared: a request that only joins the line (see `SessionService.run_on_slot`)
        self.shared = shared
        self.fence = SlotFence(self.db, account_id, shop_id, shared=shared)
        # The fence read locked the slot row and the occupant's (see `_locked_a_row`).
        self.now = utcnow()
        self.conn = self.fence.conn  # Core statements of this transaction run here
        self.events_written = 0
        self.counterpart_sessions: list[str] = []
        self._occupant: Session | None | object = UNREAD
        # The slot row names the occupant as of the last change; a first attempt trusts
        # "nobody" from it (saving a read), a retry reads the sessions themselves.
        self._trust_slot_row = trust_slot_row
        # The last audit hash per session (by public id), as written here.
        self._chain: dict[str, str | None] = {}
        self._audit_rows: list[tuple[Session, dict[str, Any]]] = []
        self._event_rows: list[dict[str, Any]] = []
        uow.after_commit(self._after_commit)

    def _after_commit(self) -> None:
        """Once committed: events start webhook delivery, counterpart messages detection."""
        hooks = self.service.hooks
        if self.events_written:
            hooks.events_written()
        if self.counterpart_sessions:
            hooks.counterpart_messages(self.counterpart_sessions)

    # ---- reads -------------------------------------------------------------------
    def occupant(self) -> Session | None:
        """The session holding the slot. Read once per transaction, then kept current by
        `set_status` — the only place that changes `holds_slot` inside a slot transaction."""
        if (self._occupant is UNREAD and self._trust_slot_row
                and self.fence.occupant_session_id is None):
            self._occupant = None
        if self._occupant is UNREAD:
            if self.shared:  # loading it would lock its row for a change
                raise NeedsTheSlot()
            self._occupant = self.db.execute(
                select(Session).where(
                    Session.account_id == self.account_id,
                    Session.shop_id == self.shop_id,
                    Session.holds_slot.is_(True),
                ).with_for_update()
            ).scalar_one_or_none()
            if self._occupant is not None:
                self._locked_a_row()
        return self._occupant  # type: ignore[return-value]

    def _locked_a_row(self) -> None:
        """A session row this transaction may change is now locked (`FOR UPDATE`): take
        the time of the change from here, so that a heartbeat or message that committed
        while we waited for the row is ordered before it (`app.sessions.activity`)."""
        if not self._audit_rows and not self._event_rows:
            self.now = utcnow()

    def occupant_id(self) -> str | None:
        """The occupant's session id, without a read when nothing here looked or changed."""
        if self._occupant is UNREAD and self._trust_slot_row:
            return self.fence.occupant_session_id
        occupant = self.occupant()
        return occupant.session_id if occupant is not None else None

    def occupant_precedence(self) -> tuple[str, rules.Precedence] | None:
        """The occupant's public id and precedence, or None when the slot is free.

        On a first attempt, from the columns read with the fence (`SlotFence.occupant`):
        no load and no row lock, since deciding to wait in line changes nothing of the
        occupant, and the fence stands for its status. Otherwise from `occupant()`."""
        if self._occupant is UNREAD and self._trust_slot_row:
            if self.fence.occupant_session_id is None:
                return None
            row = self.fence.occupant
            if row is not None:
                return self.fence.occupant_session_id, rules.precedence(
                    session_type=SessionType(row.session_type), priority=row.priority,
                    requested_at=row.requested_at, seq=row.id, status=S(row.status))
        if self.shared:
            raise NeedsTheSlot()
        occupant = self.occupant()
        return None if occupant is None else (occupant.session_id, precedence_of(occupant))

    def insert_session(self, session: Session) -> None:
        """Insert a new session row and keep `session` as its persistent object.

        One Core INSERT of the columns as set on the object (no ORM flush machinery
        for a row we just built); the object then joins the unit of work as loaded, so
        later changes to it in this transaction are flushed as usual."""
        state = inspect(session).dict
        for key in _SESSION_COLUMNS:
            if key not in state:  # unset: the column's default, on the object too
                setattr(session, key, _SESSION_DEFAULTS.get(key))
        # NULLs are left to the table (SQL NULL, also for JSON columns, where an explicit
        # None would be stored as JSON 'null'); fewer values to convert and escape.
        row = {key: value for key in _SESSION_COLUMNS
               if (value := state[key]) is not None or key in _SESSION_DEFAULTS}
        session.id = _INSERT_SESSION.insert(self.conn, row)
        make_transient_to_detached(session)
        self.db.add(session)
        self._chain.setdefault(session.session_id, None)  # no audit rows before this one

    def waiting(self) -> list[int]:
        """Primary keys of the sessions waiting for the slot, highest precedence first
        (owner-paused ones excluded). Only the precedence columns are read: a busy slot
        can have hundreds in line, and only the first is ever loaded as an object."""
        rows = self.db.execute(
            select(Session.id, Session.session_type, Session.priority, Session.requested_at,
                   Session.status).where(
                Session.account_id == self.account_id,
                Session.shop_id == self.shop_id,
                one_of(Session.status, [str(S.PENDING), str(S.PAUSED)]),
                or_(Session.pause_cause.is_(None), Session.pause_cause != PauseCause.OWNER),
            )
        ).all()
        ordered = sorted(rows, key=lambda r: rules.precedence(
            session_type=SessionType(r.session_type), priority=r.priority,
            requested_at=r.requested_at, seq=r.id, status=SessionStatus(r.status)))
        return [r.id for r in ordered]

    def position_of_newest(self, session: Session) -> int:
        """The place in line of `session`, the slot's newest request: 1 + the waiting
        sessions of a better or equal class (human before robot, priority, type rank),
        since among equals the earlier request goes first. One COUNT, however long the
        line (a hot slot can have hundreds waiting)."""
        me = precedence_of(session)
        ahead = _COUNT_AHEAD.scalar(self.conn, {
            "account_id": self.account_id, "shop_id": self.shop_id, "session_pk": session.id,
            "robot": int(me.robot), "priority": me.priority, "type_rank": me.type_rank,
        })
        return int(ahead) + 1

    def load(self, session_id: str) -> Session:
        """The session, its row locked for this transaction (see `_locked_a_row`)."""
        row = self.db.execute(
            select(Session).where(Session.session_id == session_id).with_for_update()
        ).scalar_one_or_none()
        if row is None or row.slot != (self.account_id, self.shop_id):
            raise NotFound(f"session {session_id} not found")
        self._locked_a_row()
        return row

    # ---- writes ------------------------------------------------------------------
    def audit(
        self,
        session: Session,
        operation: str,
        *,
        from_status: str | None,
        to_status: str | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> None:
        """Append an audit row (to the session's current status unless `to_status` says
        otherwise). Within a slot transaction, audit a session only through here, so the
        remembered chain head stays right.

        The row chains to the session's anchored head (`sessions.audit_head`, read with
        the row), and the new head is set on the session: it is written by the INSERT
        or UPDATE of the session this transaction makes anyway when the audit comes
        before it (a new session is audited before it is inserted; `set_status` audits
        before it flushes), else by one UPDATE at commit. A session not inserted yet
        gets its primary key in the row when the rows are written."""
        key = session.session_id
        if key in self._chain:
            prev_hash = self._chain[key]
        elif session.id is None:
            prev_hash = None  # a new session, inserted later in this transaction
        else:
            prev_hash = session.audit_head or last_hash(self.db, session.id)
        row = operation_values(
            session_pk=session.id or 0,
            session_id=session.session_id,
            operation=operation,
            from_status=from_status,
            to_status=to_status or session.status,
            actor=actor or self.actor,
            at=self.now,
            prev_hash=prev_hash,
            reason=reason,
            details=details,
        )
        self._audit_rows.append((session, row))
        self._chain[key] = session.audit_head = row["row_hash"]

    def event(
        self,
        type: str,
        session: Session,
        data: dict[str, Any] | None = None,
        audience: str | None = None,
    ) -> None:
        self._event_rows.append(event_values(type=type, at=self.now, session=session,
                                             data=data, audience=audience))
        self.events_written += 1

    def write_records(self) -> None:
        """Insert the audit rows and events collected so far (one statement per table)."""
        if self._audit_rows:
            if any(session.id is None for session, _ in self._audit_rows):
                self.db.flush()  # a session added to the unit of work, not inserted yet
            for session, row in self._audit_rows:
                row["session_pk"] = session.id
            _INSERT_OPERATIONS.execute_many(self.conn, [row for _, row in self._audit_rows])
            self._audit_rows = []
        if self._event_rows:
            _INSERT_EVENTS.execute_many(self.conn, self._event_rows)
            self._event_rows = []

    def set_status(
        self,
        session: Session,
        target: SessionStatus,
        *,
        operation: str,
        event: str | None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> None:
        """Move `session` to `target` (checked against the state machine), audit it, announce it."""
        before = self.apply_status(session, target, reason=reason)
        # Audited first, so the new chain head rides on the session's UPDATE.
        self.audit(session, operation, from_status=before, reason=reason, details=details)
        # Flush the release before anyone claims the slot in this transaction:
        # the unique occupant key must never see two holders, even mid-flush.
        self.db.flush()
        if event:
            data = {"previous_status": str(before), "reason": reason}
            data.update(event_data or {})
            self.event(event, session, data)

    def apply_status(
        self, session: Session, target: SessionStatus, *, reason: str | None = None
    ) -> SessionStatus:
        """The in-memory half of `set_status` (no flush, audit or event): the status and
        everything that follows from it. Answers the status before."""
        before = S(session.status)
        if self.shared and (target.occupies_slot or session.holds_slot):
            raise NeedsTheSlot()
        rules.check_transition(before, target)
        session.status = target
        if target.occupies_slot:
            session.holds_slot = True
            session.pause_cause = None
            if session.activated_at is None:
                session.activated_at = self.now
            self._occupant = session
        else:
            # A holder that leaves leaves nobody (the slot has at most one holder).
            if self._occupant is session or (session.holds_slot and self._occupant is UNREAD):
                self._occupant = None
            session.holds_slot = None
        if target.is_terminal:
            session.ended_at = self.now
            session.end_reason = reason or session.end_reason
        session.deadline_at = self.service.deadline_for(session, self.now)
        return before

    def activate(self, session: Session, *, reason: str | None = None) -> None:
        """Give the free slot to `session` (PENDING → ACTIVE, or PAUSED → ACTIVE)."""
        was = session.status
        # Idle time counts from activation: a session that waited in line is not stale.
        session.last_activity_at = self.now
        if was == S.PAUSED:
            self.set_status(session, S.ACTIVE, operation="resume", event="session.resumed",
                            reason=reason or "slot free")
        else:
            self.set_status(session, S.ACTIVE, operation="activate", event="session.activated",
                            reason=reason)

    def preempt(self, occupant: Session, by: Session) -> None:
        """Seed cases 1, 3, 4: the occupant makes way for a higher-precedence request."""
        details = {"preempted_by": by.session_id, "by_type": str(by.session_type)}
        occupant.preempted_by = by.session_id
        by.interrupted_session_id = occupant.session_id
        if occupant.status == S.TRANSFERRED:
            self.cancel_open_transfers(occupant, reason="interrupted by urgent takeover")
            self.set_status(occupant, S.CANCELLED, operation="interrupt",
                            event="session.cancelled", reason="interrupted", details=details,
                            event_data={"preempted_by": by.session_id})
        else:
            occupant.pause_cause = PauseCause.PREEMPTED
            self.set_status(occupant, S.PAUSED, operation="preempt", event="session.paused",
                            reason="preempted", details=details,
                            event_data={"preempted_by": by.session_id, "wait": True})

    def promote_next_waiting(self) -> Session | None:
        """When the slot is free, hand it to the highest-precedence waiting session."""
        if self.occupant() is not None:
            return None
        for pk in self.waiting():
            candidate = self.db.get_one(Session, pk)
            self.activate(candidate, reason="slot freed")
            return candidate
        return None

    def claim_or_wait(self, session: Session, *, on_conflict: str = "queue") -> list[Session]:
        """Run `session` (PENDING, or PAUSED being resumed) through the conflict rules.

        Returns the sessions it displaced. Raises SlotOccupied for `reject`. A request
        that only waits in line never loads the occupant (see `occupant_precedence`)."""
        named = self.occupant_precedence()
        if named is None:
            self.activate(session)
            return []
        occupant_id, occupant_precedence = named
        if occupant_id == session.session_id:
            return []
        decision = rules.decide_conflict(
            requester_type=SessionType(session.session_type),
            requester=precedence_of(session),
            occupant=occupant_precedence,
        )
        if decision is rules.ConflictDecision.PREEMPT:
            occupant = self.occupant()
            assert occupant is not None  # named above, under the same lock and fence
            self.preempt(occupant, by=session)
            self.activate(session, reason="preempted " + occupant.session_id)
            return [occupant]
        if on_conflict == "reject":
            occupant = self.occupant()
            assert occupant is not None
            view = SessionView.model_validate(occupant).model_dump(mode="json")
            raise SlotOccupied(
                f"slot ({self.account_id}, {self.shop_id}) is occupied by a "
                f"{occupant.session_type} session ({occupant.status}) which this request "
                "may not preempt",
                occupant=view,
            )
        return []

    def cancel_open_transfers(self, session: Session, *, reason: str) -> None:
        for transfer in self.open_transfers(session):
            transfer.status = TransferStatus.CANCELLED
            transfer.ended_at = self.now
            transfer.first_response_due_at = None
            self.event("transfer.cancelled", session,
                       {"transfer_id": transfer.transfer_id, "reason": reason},
                       audience=Audience.DESK)

    def open_transfers(self, session: Session) -> list[Transfer]:
        return list(
            self.db.execute(
                select(Transfer).where(
                    Transfer.session_pk == session.id,
                    one_of(Transfer.status, [str(TransferStatus.PENDING),
                                            str(TransferStatus.ACCEPTED)]),
                )
            ).scalars()
        )

    def leave_slot(
        self,
        session: Session,
        target: SessionStatus,
        *,
        operation: str,
        event: str,
        reason: str | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """End or pause `session`, then promote the next waiting one if the slot is free."""
        held = bool(session.holds_slot)
        self.set_status(session, target, operation=operation, event=event, reason=reason,
                        details=details)
        if held:
            self.promote_next_waiting()


def precedence_of(session: Session) -> rules.Precedence:
    return rules.precedence(
        session_type=SessionType(session.session_type),
        priority=session.priority,
        requested_at=session.requested_at,
        seq=session.id or 0,
        status=SessionStatus(session.status),
    )


class SessionService:
    """Every session operation of SPEC §3, safe with many processes at once."""

    def __init__(
        self,
        *,
        database: Database,
        locks: SlotLocks,
        settings: Settings,
        hooks: ServiceHooks | None = None,
    ) -> None:
        self.database = database
        self.locks = locks
        self.settings = settings
        self.hooks = hooks or ServiceHooks()
        self.busy_slots = BusySlots()
        self.activity = SessionActivity(
            database=database, settings=settings,
            counterpart_messages=lambda ids: self.hooks.counterpart_messages(ids),
        )

    # ---- the slot transaction --------------------------------------------------------
    def run_on_slot(
        self, account_id: str, shop_id: str, actor: str, work: Callable[[SlotTx], T], *,
        joins_line: bool = False,
    ) -> T:
        """Run `work` under the slot lock in one transaction, fenced, retried if stale.

        `joins_line`: `work` probably only joins the line of an occupied slot (a create
        on a slot where this process saw the last create wait, `busy_slots`). It is
        first tried without the slot lock, in a transaction holding the slot row shared:
        such requests run side by side, and a change of the slot (which holds that row
        exclusively) waits for them, or they for it. The first step that would change
        the slot (`NeedsTheSlot`), a lost race or a conflict rolls that attempt back
        and the operation runs as below. On SQLite (no row locks) it always runs
        below."""
        if joins_line and self.database.dialect != "sqlite":
            attempt = self._run_in_line(account_id, shop_id, actor, work)
            if attempt is not None:
                return attempt[0]
            self.busy_slots.forget((account_id, shop_id))
        last_error: Exception | None = None
        for attempt_no in range(MAX_ATTEMPTS):
            try:
                with self.database.unit_of_work(
                        under=self.locks.hold(account_id, shop_id)) as uow:
                    tx = SlotTx(self, uow, account_id, shop_id, actor,
                                trust_slot_row=attempt_no == 0)
                    result = work(tx)
                    tx.write_records()
                    tx.fence.advance(tx.occupant_id())
                    uow.commit()
                return result
            except (FenceRejected, IntegrityError, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                    raise
                last_error = exc
                log.info("slot (%s, %s) attempt %d retried: %s", account_id, shop_id,
                         attempt_no + 1, exc.__class__.__name__)
                wait_a_little(attempt_no)
        if isinstance(last_error, FenceRejected):
            raise last_error
        raise ServiceUnavailable(
            f"slot ({account_id}, {shop_id}) stayed contended after {MAX_ATTEMPTS} attempts; "
            "retry later"
        ) from last_error

    def _run_in_line(
        self, account_id: str, shop_id: str, actor: str, work: Callable[[SlotTx], T]
    ) -> tuple[T] | None:
        """`work` in a shared slot transaction; None when it must run under the lock."""
        try:
            with self.database.unit_of_work() as uow:
                tx = SlotTx(self, uow, account_id, shop_id, actor, shared=True)
                try:
                    result = work(tx)
                except NeedsTheSlot:
                    return None  # nothing was written: the unit of work rolls back
                tx.write_records()
                uow.commit()
        except (IntegrityError, OperationalError) as exc:
            if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                raise
            log.info("slot (%s, %s): joining the line raced (%s); under the lock now",
                     account_id, shop_id, exc.__class__.__name__)
            return None
        return (result,)

    def run_on_session(
        self,
        session_id: str,
        actor: str,
        work: Callable[[SlotTx, Session], T],
        guard: Guard | None = None,
    ) -> T:
        """Run `work` on one session under its slot lock. `guard(session)`, if given, runs
        first inside the same transaction and may raise to refuse the operation (the HTTP
        layer checks there who controls the session, so the check cannot go stale)."""
        account_id, shop_id = self.slot_of(session_id)

        def guarded(tx: SlotTx) -> T:
            session = tx.load(session_id)
            if guard is not None:
                guard(session)
            return work(tx, session)

        return self.run_on_slot(account_id, shop_id, actor, guarded)

    def slot_of(self, session_id: str) -> tuple[str, str]:
        with self.database.read() as db:
            row = db.execute(
                select(Session.account_id, Session.shop_id).where(
                    Session.session_id == session_id
                )
            ).one_or_none()
        if row is None:
            raise NotFound(f"session {session_id} not found")
        return row[0], row[1]

    def deadline_for(self, session: Session, now: datetime) -> datetime | None:
        """When the sweep times the session out (SPEC §3.7); None once terminal."""
        return deadline_after(self.settings, session, now)

    # ---- reads -----------------------------------------------------------------------
    def get(self, session_id: str) -> SessionView:
        with self.database.read() as db:
            row = db.execute(
                select(Session).where(Session.session_id == session_id)
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"session {session_id} not found")
            return SessionView.model_validate(row)

    def get_transfer(self, transfer_id: str) -> TransferView:
        with self.database.read() as db:
            row = db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"transfer {transfer_id} not found")
            return TransferView.model_validate(row)

    # ---- create ----------------------------------------------------------------------
    def create(
        self,
        request: SessionRequest,
        *,
        actor: str,
        client_id: str | None = None,
        origin: Origin = Origin.LIVE,
        in_transaction: Callable[[DbSession, CreateOutcome], None] | None = None,
    ) -> CreateOutcome:
        """Ask for the slot: ACTIVE at once, preempting a lower robot, or PENDING in line.

        `in_transaction(db, outcome)` runs inside the same transaction just before the
        commit (the HTTP layer stores the Idempotency-Key answer there, so the session
        and its stored answer commit together or not at all)."""
        session_type = request.session_type
        task_type = request.task_type or rules.DEFAULT_TASK_BY_TYPE[session_type]
        priority = request.priority or rules.default_priority(session_type, request.task_type)
        public_id = new_id("ses")

        def work(tx: SlotTx) -> CreateOutcome:
            free = tx.occupant_precedence() is None
            session = Session(
                session_id=public_id,
                account_id=request.account_id,
                shop_id=request.shop_id,
                session_type=session_type,
                task_type=task_type,
                priority=int(priority),
                status=S.PENDING,
                owner_id=request.owner_id,
                client_id=client_id,
                assigned_agent_id=request.owner_id if session_type.is_human else None,
                origin=origin,
                created_at=tx.now,
                requested_at=tx.now,
                last_activity_at=tx.now,
                reason=request.reason,
                context=request.context,
                message_count=0,
                robot_message_count=0,
                human_message_count=0,
                counterpart_message_count=0,
                unanswered=False,
            )
            create_details = {"on_conflict": request.on_conflict, "priority": int(priority)}
            if free:
                # The common case, in one INSERT: the row is written ACTIVE at once, with
                # the same audit trail and event as a PENDING row activated afterwards.
                tx.apply_status(session, S.ACTIVE)
                tx.audit(session, "create", from_status=None, to_status=S.PENDING,
                         reason=request.reason, details=create_details)
                tx.audit(session, "activate", from_status=S.PENDING)
                tx.insert_session(session)  # with its audit head
                tx.event("session.activated", session,
                         {"previous_status": str(S.PENDING), "reason": None})
                displaced: list[Session] = []
            else:
                session.deadline_at = self.deadline_for(session, tx.now)
                tx.audit(session, "create", from_status=None, reason=request.reason,
                         details=create_details)
                tx.insert_session(session)  # with its audit head
                displaced = tx.claim_or_wait(session, on_conflict=request.on_conflict)
            if session.status == S.PENDING:
                self.busy_slots.mark((request.account_id, request.shop_id))
                tx.event("session.queued", session, {
                    "occupant_session_id": tx.occupant_id(),
                    "position": tx.position_of_newest(session),
                })
            outcome = CreateOutcome(
                session=SessionView.model_validate(session),
                preempted=[SessionView.model_validate(d) for d in displaced],
            )
            if in_transaction is not None:
                in_transaction(tx.db, outcome)
            return outcome

        slot = (request.account_id, request.shop_id)
        return self.run_on_slot(*slot, actor, work, joins_line=(
            request.on_conflict == "queue" and slot in self.busy_slots))

    # ---- transitions -----------------------------------------------------------------
    def pause(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        """The owner pauses: the slot goes to the next waiting session; this one stays
        paused until its owner resumes it."""

        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(S(session.status), S.PAUSED)
            session.pause_cause = PauseCause.OWNER
            tx.leave_slot(session, S.PAUSED, operation="pause", event="session.paused",
                          reason=reason or "paused by owner")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def resume(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        """A resume is a new request with the session's precedence: take the free slot,
        preempt a lower robot, or wait in line (PAUSED, now waiting for promotion)."""

        def work(tx: SlotTx, session: Session) -> SessionView:
            if session.status != S.PAUSED:
                rules.check_transition(S(session.status), S.ACTIVE)
                raise InvalidTransition(
                    current=session.status, target=S.ACTIVE,
                    allowed=sorted(rules.ALLOWED_TRANSITIONS[S(session.status)]),
                    detail=f"only a PAUSED session can be resumed; {session_id} is "
                    f"{session.status}" + (" and is activated when the slot frees"
                                           if session.status == S.PENDING else ""),
                )
            before_cause = session.pause_cause
            session.pause_cause = PauseCause.PREEMPTED  # in line from now on
            if before_cause == PauseCause.OWNER:
                session.requested_at = tx.now  # back in line as a new request
            tx.claim_or_wait(session)
            if session.status == S.PAUSED:
                session.last_activity_at = tx.now
                session.deadline_at = self.deadline_for(session, tx.now)
                occupant = tx.occupant()
                tx.audit(session, "resume-wait", from_status=S.PAUSED, reason=reason,
                         details={"occupant_session_id": occupant.session_id if occupant else None})
                tx.event("session.queued", session, {
                    "occupant_session_id": occupant.session_id if occupant else None,
                })
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def complete(
        self, session_id: str, *, actor: str, reason: str | None = None, result: Any = None,
        guard: Guard | None = None,
    ) -> SessionView:
        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(S(session.status), S.COMPLETED)
            if result is not None:
                session.result = result
            for transfer in tx.open_transfers(session):
                accepted = transfer.status == TransferStatus.ACCEPTED
                transfer.status = TransferStatus.COMPLETED if accepted else TransferStatus.CANCELLED
                transfer.ended_at = tx.now
                transfer.first_response_due_at = None
                tx.event("transfer.completed" if accepted else "transfer.cancelled", session,
                         {"transfer_id": transfer.transfer_id}, audience=Audience.DESK)
            tx.leave_slot(session, S.COMPLETED, operation="complete", event="session.completed",
                          reason=reason or "completed")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def cancel(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(S(session.status), S.CANCELLED)
            tx.cancel_open_transfers(session, reason=reason or "session cancelled")
            tx.leave_slot(session, S.CANCELLED, operation="cancel", event="session.cancelled",
                          reason=reason or "cancelled")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def expire(
        self, session_id: str, *, actor: str = "system:sweep", now: datetime | None = None
    ) -> SessionView | None:
        """Time a session out if it is still past its deadline (re-checked under the lock)."""

        def work(tx: SlotTx, session: Session) -> SessionView | None:
            at = now or tx.now
            if S(session.status).is_terminal or session.deadline_at is None:
                return None
            if session.deadline_at > at:
                return None  # a heartbeat or message arrived since the sweep looked
            tx.cancel_open_transfers(session, reason="session timed out")
            tx.leave_slot(session, S.TIMEOUT, operation="timeout", event="session.timeout",
                          reason="timeout",
                          details={"deadline_at": session.deadline_at.isoformat(),
                                   "status_before": str(session.status)})
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work)

    def heartbeat(
        self, session_id: str, *, actor: str, control: Control | None = None,
        controlled_if: ControlledIf | None = None,
    ) -> SessionView:
        """Keep a session alive; answers its current status (terminal ones included).
        Under the session's row lock, not a slot transaction (`app.sessions.activity`)."""
        return self.activity.heartbeat(session_id, control=control,
                                       controlled_if=controlled_if)

    # ---- transfer to a human ----------------------------------------------------------
    def transfer(
        self, session_id: str, request: TransferRequest, *, actor: str,
        guard: Guard | None = None,
    ) -> TransferView:
        """SPEC §3.6 in one atomic step: record, TRANSFERRED (keeps the slot), tell the
        robot to leave, offer the desk."""

        def work(tx: SlotTx, session: Session) -> TransferView:
            rules.check_transition(S(session.status), S.TRANSFERRED)
            return self._open_transfer(tx, session, request)

        return self.run_on_session(session_id, actor, work, guard)

    def _open_transfer(
        self, tx: SlotTx, session: Session, request: TransferRequest
    ) -> TransferView:
        offered = choose_agent(
            tx.db,
            requested_agent_id=request.agent_id,
            skill=str(session.task_type),
            default_capacity=self.settings.max_concurrent_sessions,
        )
        history = self._history_snapshot(tx.db, session)
        transfer = Transfer(
            transfer_id=new_id("trf"),
            session_pk=session.id,
            session_id=session.session_id,
            status=TransferStatus.PENDING,
            urgency=int(request.urgency),
            reason=request.reason,
            trigger=request.trigger,
            requested_agent_id=request.agent_id,
            offered_agent_id=offered,
            history=history,
            task_state=request.task_state,
            customer_info=request.customer_info,
            suggestion=request.suggestion,
            escalations=0,
            created_at=tx.now,
            offered_at=tx.now,
            expires_at=tx.now + timedelta(seconds=self.settings.transfer_timeout),
        )
        tx.db.add(transfer)
        session.last_activity_at = tx.now
        tx.set_status(
            session, S.TRANSFERRED, operation="transfer", event="session.transferred",
            reason=request.reason,
            details={"transfer_id": transfer.transfer_id, "trigger": str(request.trigger),
                     "urgency": int(request.urgency), "offered_agent_id": offered},
            event_data={"transfer_id": transfer.transfer_id, "leave": True},
        )
        tx.event("transfer.offered", session, {
            "transfer_id": transfer.transfer_id, "urgency": int(request.urgency),
            "reason": request.reason, "trigger": str(request.trigger),
            "offered_agent_id": offered,
        }, audience=Audience.DESK)
        tx.db.flush()
        return TransferView.model_validate(transfer)

    @staticmethod
    def _history_snapshot(db: DbSession, session: Session) -> dict[str, Any]:
        rows = db.execute(
            select(Message)
            .where(Message.session_pk == session.id)
            .order_by(Message.sent_at.desc(), Message.id.desc())
            .limit(HISTORY_SNAPSHOT)
        ).scalars().all()
        return {
            "session_id": session.session_id,
            "message_count": session.message_count,
            "recent": [
                {"message_id": m.message_id, "sender_role": str(m.sender_role),
                 "content": m.content, "sent_at": m.sent_at.isoformat()}
                for m in reversed(rows)
            ],
        }

    def accept_transfer(self, transfer_id: str, *, agent_id: str, actor: str) -> TransferView:
        """The first agent to accept wins; the claim is a conditional UPDATE."""
        session_id = self.get_transfer(transfer_id).session_id

        def work(tx: SlotTx, session: Session) -> TransferView:
            transfer = tx.db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one()
            if transfer.status != TransferStatus.PENDING:
                raise_already_taken(transfer)
            transfer.status = TransferStatus.ACCEPTED
            transfer.agent_id = agent_id
            transfer.accepted_at = tx.now
            transfer.first_response_due_at = tx.now + timedelta(
                seconds=self.settings.first_response_timeout)
            session.assigned_agent_id = agent_id
            session.last_activity_at = tx.now
            session.deadline_at = self.deadline_for(session, tx.now)
            tx.audit(session, "transfer-accept", from_status=session.status,
                     actor=actor, details={"transfer_id": transfer_id, "agent_id": agent_id})
            tx.event("transfer.accepted", session,
                     {"transfer_id": transfer_id, "agent_id": agent_id}, audience=Audience.DESK)
            tx.event("transfer.accepted", session,
                     {"transfer_id": transfer_id, "agent_id": agent_id},
                     audience=Audience.OWNER)
            tx.db.flush()
            return TransferView.model_validate(transfer)

        return self.run_on_session(session_id, actor, work)

    def reassign_transfer(
        self, transfer_id: str, *, agent_id: str, actor: str, reason: str | None = None,
    ) -> TransferView:
        """Hand an open transfer to another agent (SPEC §12), audited, `transfer.reassigned`.

        An accepted transfer changes its assignee (`agent_id`) and the session's
        `assigned_agent_id`, so only the new agent's human messages are accepted from
        now on and the routing's capacity counts follow; a PENDING one is offered to the
        new agent (still open to the whole desk). Naming the current agent changes
        nothing. The first-response timer runs from the accept and is not restarted."""
        session_id = self.get_transfer(transfer_id).session_id

        def work(tx: SlotTx, session: Session) -> TransferView:
            transfer = tx.db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one()
            accepted = transfer.status == TransferStatus.ACCEPTED
            if not accepted and transfer.status != TransferStatus.PENDING:
                raise Conflict(
                    f"transfer {transfer_id} is {transfer.status}; only PENDING or ACCEPTED "
                    "transfers can be reassigned", current_status=str(transfer.status))
            before = transfer.agent_id if accepted else transfer.offered_agent_id
            if before == agent_id:
                return TransferView.model_validate(transfer)
            if accepted:
                transfer.agent_id = agent_id
                session.assigned_agent_id = agent_id
            else:
                transfer.offered_agent_id = agent_id
                transfer.offered_at = tx.now
            details = {"transfer_id": transfer_id, "from_agent_id": before,
                       "agent_id": agent_id, "transfer_status": str(transfer.status)}
            tx.audit(session, "transfer-reassign", from_status=session.status, reason=reason,
                     details=details)
            tx.event("transfer.reassigned", session, {**details, "reason": reason},
                     audience=Audience.DESK)
            tx.db.flush()
            return TransferView.model_validate(transfer)

        return self.run_on_session(session_id, actor, work)

    # ---- hand-back to the robot --------------------------------------------------------
    def hand_back(
        self, session_id: str, request: HandBackRequest, *, actor: str,
        guard: Guard | None = None,
        in_transaction: Callable[[DbSession, HandBackOutcome], None] | None = None,
    ) -> HandBackOutcome:
        """SPEC §12 in one slot transaction: the transfer and the TRANSFERRED session
        complete; with `needs_robot` a new robot session for the bot that transferred it
        (same types and priority, `handed_back_from`, the packet as its context) takes the
        slot at once — unless a session waiting in line outranks it under §3.5, which then
        preempts it as it would any robot. Otherwise the slot goes to the next in line.
        The bot gets `session.handed_back` with the packet. `in_transaction(db, outcome)`
        runs in the same transaction at the end (the Idempotency-Key's answer)."""
        packet = request.packet()

        def work(tx: SlotTx, session: Session) -> HandBackOutcome:
            if session.status != S.TRANSFERRED:
                raise InvalidTransition(
                    current=session.status, target=S.COMPLETED,
                    allowed=sorted(rules.ALLOWED_TRANSITIONS[S(session.status)]),
                    detail=f"only a TRANSFERRED session can be handed back; {session_id} is "
                    f"{session.status}")
            robot = SessionType(session.session_type).is_robot
            if request.outcome == "needs_robot" and not robot:
                raise Conflict(
                    f"session {session_id} is a {session.session_type} session: there is no "
                    "robot to hand it back to (use outcome resolved or unresolved)",
                    current_status=str(session.status))
            transfers = tx.open_transfers(session)
            assignee = next((t.agent_id for t in transfers
                             if t.status == TransferStatus.ACCEPTED), None)
            if request.agent_id is not None and assignee not in (None, request.agent_id):
                raise NotAssignee(
                    f"session {session_id} is assigned to agent {assignee}; "
                    f"{request.agent_id} may not hand it back", agent_id=assignee)
            transfer_ids = []
            for transfer in transfers:
                accepted = transfer.status == TransferStatus.ACCEPTED
                transfer.status = (TransferStatus.COMPLETED if accepted
                                   else TransferStatus.CANCELLED)
                transfer.ended_at = tx.now
                transfer.first_response_due_at = None
                transfer.hand_back = packet
                transfer_ids.append(transfer.transfer_id)
                tx.event("transfer.completed" if accepted else "transfer.cancelled", session,
                         {"transfer_id": transfer.transfer_id, "reason": "handed back"},
                         audience=Audience.DESK)
            resumed: Session | None = None
            if request.outcome == "needs_robot":
                resumed = Session(
                    session_id=new_id("ses"), account_id=session.account_id,
                    shop_id=session.shop_id, session_type=session.session_type,
                    task_type=session.task_type, priority=session.priority,
                    status=S.PENDING, owner_id=session.owner_id, client_id=session.client_id,
                    origin=Origin.LIVE, created_at=tx.now, requested_at=tx.now,
                    last_activity_at=tx.now, reason=f"handed back from {session_id}",
                    context=packet, handed_back_from=session_id, message_count=0,
                    robot_message_count=0, human_message_count=0,
                    counterpart_message_count=0, unanswered=False,
                )
                session.handed_back_to = resumed.session_id
            details = {"outcome": request.outcome, "transfer_ids": transfer_ids,
                       "agent_id": request.agent_id or assignee,
                       "handed_back_to": session.handed_back_to}
            tx.set_status(session, S.COMPLETED, operation="hand-back",
                          event="session.completed", reason="handed back", details=details)
            tx.event("session.handed_back", session, {
                **packet, "transfer_ids": transfer_ids, "agent_id": request.agent_id or assignee,
                "resumed_session_id": session.handed_back_to,
            }, audience=Audience.OWNER)
            if resumed is None:
                tx.promote_next_waiting()
            else:
                self._resume_after_hand_back(tx, resumed)
            outcome = HandBackOutcome(
                completed=SessionView.model_validate(session),
                resumed=SessionView.model_validate(resumed) if resumed is not None else None)
            if in_transaction is not None:
                in_transaction(tx.db, outcome)
            return outcome

        return self.run_on_session(session_id, actor, work, guard)

    def _resume_after_hand_back(self, tx: SlotTx, resumed: Session) -> None:
        """The bot's new session takes the slot its old one just left; a waiting session
        that outranks it (a human in line, say) preempts it at once, as it would have
        had it asked now."""
        tx.apply_status(resumed, S.ACTIVE)
        tx.insert_session(resumed)
        tx.audit(resumed, "create", from_status=None, to_status=S.PENDING,
                 reason=resumed.reason,
                 details={"handed_back_from": resumed.handed_back_from,
                          "priority": resumed.priority})
        tx.audit(resumed, "activate", from_status=S.PENDING)
        tx.event("session.activated", resumed, {
            "previous_status": str(S.PENDING), "reason": "handed back",
            "handed_back_from": resumed.handed_back_from})
        for pk in tx.waiting()[:1]:
            candidate = tx.db.get_one(Session, pk)
            decision = rules.decide_conflict(
                requester_type=SessionType(candidate.session_type),
                requester=precedence_of(candidate), occupant=precedence_of(resumed))
            if decision is rules.ConflictDecision.PREEMPT:
                tx.preempt(resumed, by=candidate)
                tx.activate(candidate, reason="preempted " + resumed.session_id)

    # ---- messages ------------------------------------------------------------------
    def record_messages(
        self, session_id: str, messages: Sequence[LiveMessage], *, actor: str,
        control: Control | None = None, agent_id: str | None = None,
        as_operator: bool = True,
    ) -> MessageOutcome:
        """Store live messages on an ACTIVE or TRANSFERRED session, de-duplicated by id,
        recorded as posted by `actor` (and `agent_id` for the desk). On an accepted
        transfer human messages come from its assignee only, or from an operator
        (`as_operator`) naming no agent (SPEC §12)."""
        return self.activity.record_messages(session_id, messages, control=control,
                                             posted_by=actor, agent_id=agent_id,
                                             as_operator=as_operator)


def raise_already_taken(transfer: Transfer) -> None:
    if transfer.status == TransferStatus.ACCEPTED:
        raise AlreadyAccepted(
            f"transfer {transfer.transfer_id} was already accepted by {transfer.agent_id}",
            agent_id=transfer.agent_id,
        )
    raise Conflict(
        f"transfer {transfer.transfer_id} is {transfer.status}; only PENDING transfers "
        "can be accepted",
        current_status=str(transfer.status),
    )


__all__ = [
    "CreateOutcome",
    "LiveMessage",
    "MessageOutcome",
    "ServiceHooks",
    "SessionService",
    "SlotTx",
]
