"""The slot transaction: one lock-and-fence discipline under every change of a slot.

A slot transaction takes the slot lock, opens a unit of work, reads the slot's fence,
applies the change (state machine, conflicts, promotion, audit rows, outbox events),
advances the fence and commits. A stale lock holder fails at the fence or on the
unique occupant key and the whole unit is retried from a fresh read. `SlotTx` is the
work's view of one such transaction; `app.sessions.runner.SlotTransactions` runs them
(the session service, the transfers, corrections and imports all change a slot
through it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import and_, bindparam, case, func, insert, inspect, or_, select, true
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import make_transient_to_detached

from app.audit.models import OPERATIONS
from app.audit.operations import AuditOperation
from app.audit.trail import last_hash, operation_values
from app.db import UnitOfWork, one_of, utcnow
from app.errors import NotFound, SlotOccupied
from app.events.models import EVENTS
from app.events.outbox import Audience, event_values
from app.events.types import EventType
from app.fastsql import Prepared
from app.sessions import rules
from app.sessions.enums import PauseCause, SessionStatus, SessionType
from app.sessions.models import SESSIONS, Session
from app.sessions.schemas import SessionView
from app.sessions.slot import SlotFence
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from app.sessions.runner import SlotTransactions

T = TypeVar("T")
Guard = Callable[[Session], None]
MAX_ATTEMPTS = 6
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
        one_of(c.status, [S.PENDING, S.PAUSED]),
        or_(c.pause_cause.is_(None), c.pause_cause != PauseCause.OWNER),
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
        service: SlotTransactions,
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
        self.account_id = account_id
        self.shop_id = shop_id
        self.actor = actor
        # shared: a request that only joins the line (see `SlotTransactions.run_on_slot`)
        self.shared = shared
        self.fence = SlotFence(uow.connection, account_id, shop_id, shared=shared)
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

    @property
    def db(self) -> DbSession:
        """The transaction's ORM session (made when first asked for: a create on a free
        slot runs on Core statements alone, `UnitOfWork`'s `core_first`)."""
        return self.uow.session

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
            # `holds_slot = true`, not `IS TRUE`: equality on every column of the unique
            # occupant key is one index entry looked up (MySQL's "const" plan, whatever
            # the statistics say), where `IS TRUE` scanned — and locked — every session
            # of the slot (a hot slot's line of PENDING requests included).
            self._occupant = self.db.execute(
                select(Session).where(
                    Session.account_id == self.account_id,
                    Session.shop_id == self.shop_id,
                    Session.holds_slot == true(),
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
                    session_type=row.session_type, priority=row.priority,
                    requested_at=row.requested_at, seq=row.id, status=row.status)
        if self.shared:
            raise NeedsTheSlot()
        occupant = self.occupant()
        return None if occupant is None else (occupant.session_id, precedence_of(occupant))

    def insert_session(self, session: Session) -> None:
        """Insert a new session row and keep `session` as its persistent object.

        One Core INSERT of the columns as set on the object (no ORM flush machinery
        for a row we just built); the object then joins the unit of work as loaded
        (`UnitOfWork.adopt`), so later changes to it in this transaction are flushed as
        usual."""
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
        self.uow.adopt(session)
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
                one_of(Session.status, [S.PENDING, S.PAUSED]),
                or_(Session.pause_cause.is_(None), Session.pause_cause != PauseCause.OWNER),
            )
        ).all()
        ordered = sorted(rows, key=lambda r: rules.precedence(
            session_type=r.session_type, priority=r.priority,
            requested_at=r.requested_at, seq=r.id, status=r.status))
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
        operation: AuditOperation,
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
        type: EventType,
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
        operation: AuditOperation,
        event: EventType | None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        event_data: dict[str, Any] | None = None,
    ) -> None:
        """Move `session` to `target` (checked against the state machine), audit it, announce it."""
        before = self.apply_status(session, target, reason=reason)
        # Audited first, so the new chain head rides on the session's UPDATE (or INSERT).
        self.audit(session, operation, from_status=before, reason=reason, details=details)
        if session.id is not None:  # else not inserted yet: its INSERT writes all this
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
        before = session.status
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

    def activate(self, session: Session, *, reason: str | None = None,
                 event_data: dict[str, Any] | None = None) -> None:
        """Give the free slot to `session` (PENDING → ACTIVE, or PAUSED → ACTIVE).

        A new session may be activated before `insert_session`: its row is then written
        ACTIVE at once, with the audit trail and event of one activated afterwards."""
        was = session.status
        # Idle time counts from activation: a session that waited in line is not stale.
        session.last_activity_at = self.now
        if was == S.PAUSED:
            self.set_status(session, S.ACTIVE, operation=AuditOperation.RESUME,
                            event=EventType.SESSION_RESUMED,
                            reason=reason or "slot free")
        else:
            self.set_status(session, S.ACTIVE, operation=AuditOperation.ACTIVATE,
                            event=EventType.SESSION_ACTIVATED,
                            reason=reason, event_data=event_data)

    def preempt(self, occupant: Session, by: Session) -> None:
        """Seed cases 1, 3, 4: the occupant makes way for a higher-precedence request."""
        details = {"preempted_by": by.session_id, "by_type": str(by.session_type)}
        occupant.preempted_by = by.session_id
        by.interrupted_session_id = occupant.session_id
        if occupant.status == S.TRANSFERRED:
            self.cancel_open_transfers(occupant, reason="interrupted by urgent takeover")
            self.set_status(occupant, S.CANCELLED, operation=AuditOperation.INTERRUPT,
                            event=EventType.SESSION_CANCELLED, reason="interrupted",
                            details=details,
                            event_data={"preempted_by": by.session_id})
        else:
            occupant.pause_cause = PauseCause.PREEMPTED
            self.set_status(occupant, S.PAUSED, operation=AuditOperation.PREEMPT,
                            event=EventType.SESSION_PAUSED,
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
            requester_type=session.session_type,
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
            self.event(EventType.TRANSFER_CANCELLED, session,
                       {"transfer_id": transfer.transfer_id, "reason": reason},
                       audience=Audience.DESK)

    def open_transfers(self, session: Session) -> list[Transfer]:
        return list(
            self.db.execute(
                select(Transfer).where(
                    Transfer.session_pk == session.id,
                    one_of(Transfer.status, [TransferStatus.PENDING,
                                            TransferStatus.ACCEPTED]),
                )
            ).scalars()
        )

    def leave_slot(
        self,
        session: Session,
        target: SessionStatus,
        *,
        operation: AuditOperation,
        event: EventType,
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
        session_type=session.session_type,
        priority=session.priority,
        requested_at=session.requested_at,
        seq=session.id or 0,
        status=session.status,
    )
