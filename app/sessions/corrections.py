"""Operator corrections (SPEC §11): merge sessions of one slot, split a session in two.

Grouping can be wrong — an import cut one conversation in two, or joined two — and an
operator fixes it by hand. Each correction is one slot transaction
(`SessionService.run_on_slot`: the slot lock, the fence read with the slot row locked,
every session row it changes read `FOR UPDATE`, the fence advanced at commit, the whole
unit retried from a fresh read when a stale holder is fenced out). So two corrections of
one slot run one after the other, each on what the other committed, and a correction
and a slot change (a promotion, a completion) are ordered the same way.

Neither touches a session that occupies the slot (ACTIVE or TRANSFERRED): live
messages and heartbeats change only such sessions, under their own row lock
(`app.sessions.activity`, `app.messages.service`), and a correction refuses them after
reading their rows `FOR UPDATE` — a session that left the slot a moment ago is read
ended, with every message it accepted committed. Message rows move by one UPDATE of
`session_pk` per correction (nothing is copied or deleted, so nothing can be lost or
doubled), and the counters and first/last times of every session touched are
recomputed from the messages it holds afterwards, in the same transaction.

The operator is the actor of every audit row; each session touched gets one audit row
and one event (`session.merged`, `session.split`) saying what moved where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Table, and_, func, or_, select, update

from app.audit.operations import AuditOperation
from app.db import affected_rows
from app.errors import CorrectionRefused, NotFound, ValidationFailed
from app.events.types import EventType
from app.ids import new_id
from app.messages.models import Message
from app.sessions.enums import Origin, SenderRole, SessionStatus
from app.sessions.models import Session
from app.sessions.schemas import SessionView
from app.sessions.service import SessionService
from app.sessions.slot_tx import SlotTx
from app.transfers.models import Transfer
from app.validation import BoundaryModel

MESSAGES = cast(Table, Message.__table__)
TRANSFERS = cast(Table, Transfer.__table__)
S = SessionStatus
MAX_MERGE_SOURCES = 50
SESSION_ID_LEN = 40
MESSAGE_ID_LEN = 128
REASON_LEN = 255


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


class MergeRequest(BoundaryModel):
    """`POST /admin/api/sessions/{id}/merge`: the session of the path goes into `into`.

    `also` names more ended sessions of the slot to merge into `into` in the same
    transaction (an extension of SPEC §11's shape: one correction, one audit moment)."""

    model_config = ConfigDict(extra="forbid")

    into: str = Field(min_length=1, max_length=SESSION_ID_LEN,
                      description="the session that receives the messages")
    also: list[str] = Field(default_factory=list, max_length=MAX_MERGE_SOURCES - 1,
                            description="more sessions of the slot to merge into `into`")
    reason: str = Field(min_length=1, max_length=REASON_LEN)

    _text = field_validator("into", "reason", mode="before")(_strip)

    @field_validator("also")
    @classmethod
    def _ids(cls, value: list[str]) -> list[str]:
        for item in value:
            if not 0 < len(item.strip()) <= SESSION_ID_LEN:
                raise ValueError(f"session ids are 1 to {SESSION_ID_LEN} characters")
        return [item.strip() for item in value]


class SplitRequest(BoundaryModel):
    """`POST /admin/api/sessions/{id}/split`: cut before `at_message_id`."""

    model_config = ConfigDict(extra="forbid")

    at_message_id: str = Field(min_length=1, max_length=MESSAGE_ID_LEN,
                               description="the first message of the new session")
    reason: str = Field(min_length=1, max_length=REASON_LEN)

    _text = field_validator("at_message_id", "reason", mode="before")(_strip)


class MergeOutcome(BaseModel):
    session: SessionView  # `into`, with its recomputed counters
    merged: list[SessionView]  # the sessions merged into it (now without messages)
    messages_moved: int
    transfers_moved: list[str]


class SplitOutcome(BaseModel):
    session: SessionView  # the session cut (the messages before the cut)
    new_session: SessionView  # the messages from the cut on
    messages_moved: int
    transfers_moved: list[str]


@dataclass
class _Tally:
    """What a session's messages add up to (`MessageService` keeps the same counters)."""

    count: int = 0
    robot: int = 0
    human: int = 0
    counterpart: int = 0
    first: datetime | None = None
    last: datetime | None = None


def merge_sessions(
    service: SessionService, session_ids: Sequence[str], *, into: str, actor: str,
    reason: str, operator: str | None = None,
) -> MergeOutcome:
    """Merge the ended sessions `session_ids` into `into` (all of one slot): their
    messages and transfers move to `into`, whose counters and times are recomputed; each
    keeps its terminal status with `merged_into` set and no messages."""
    sources = list(dict.fromkeys(session_ids))
    if not sources:
        raise ValidationFailed("name at least one session to merge",
                               [{"field": "also", "message": "no session to merge"}])
    if into in sources:
        raise ValidationFailed(f"session {into} cannot be merged into itself",
                               [{"field": "into", "message": "is the session being merged"}])
    account_id, shop_id = service.slot_of(into)

    def work(tx: SlotTx) -> MergeOutcome:
        rows = _lock_on_slot(tx, [into, *sources])
        target, merged = rows[into], [rows[sid] for sid in sources]
        _refuse_occupant(target, "merge into")
        if target.merged_into:
            raise CorrectionRefused(
                f"session {into} was merged into {target.merged_into}; merge into that one",
                session_id=into, merged_into=target.merged_into)
        for source in merged:
            _refuse_occupant(source, "merge")
            _refuse_unless_ended(source, "merged")
        pks = [s.id for s in merged]
        held = _tally(tx, pks)  # what each source held, for its own audit row
        transfers_of: dict[int, list[str]] = {pk: [] for pk in pks}
        for pk, transfer_id in tx.db.execute(
                select(TRANSFERS.c.session_pk, TRANSFERS.c.transfer_id)
                .where(TRANSFERS.c.session_pk.in_(pks)).order_by(TRANSFERS.c.id)).all():
            transfers_of[pk].append(transfer_id)
        transfers = [t for pk in pks for t in transfers_of[pk]]

        moved = affected_rows(tx.db.execute(
            update(MESSAGES).where(MESSAGES.c.session_pk.in_(pks))
            .values(session_pk=target.id)))
        if transfers:
            tx.db.execute(update(TRANSFERS).where(TRANSFERS.c.session_pk.in_(pks))
                          .values(session_pk=target.id, session_id=target.session_id))
        if target.status.is_terminal:
            _merge_times(target, merged)
        tallies = _tally(tx, [target.id])
        _apply_tally(target, tallies.get(target.id, _Tally()))
        merged_from = [s.session_id for s in merged]
        for source in merged:
            _apply_tally(source, _Tally())
            source.merged_into = target.session_id
            count = held[source.id].count if source.id in held else 0
            tx.audit(source, AuditOperation.MERGE, from_status=source.status, reason=reason,
                     details={
                "merged_into": target.session_id, "messages": count,
                "transfers": transfers_of[source.id], "operator": operator})
            tx.event(EventType.SESSION_MERGED, source, {
                "merged_into": target.session_id, "messages_moved": count, "reason": reason})
        tx.audit(target, AuditOperation.MERGE, from_status=target.status, reason=reason, details={
            "merged_from": merged_from, "messages": moved, "transfers": transfers,
            "message_count": target.message_count, "operator": operator})
        tx.event(EventType.SESSION_MERGED, target, {
            "merged_from": merged_from, "messages_moved": moved,
            "message_count": target.message_count, "reason": reason})
        tx.db.flush()
        return MergeOutcome(
            session=SessionView.model_validate(target),
            merged=[SessionView.model_validate(s) for s in merged],
            messages_moved=moved, transfers_moved=transfers)

    return service.run_on_slot(account_id, shop_id, actor, work)


def split_session(
    service: SessionService, session_id: str, *, at_message_id: str, actor: str,
    reason: str, operator: str | None = None,
) -> SplitOutcome:
    """Cut the ended session `session_id` before `at_message_id` (in the order of
    `sent_at`, then arrival): the later messages, and the transfers opened from the cut
    on, go to a new session of the same slot, type and origin, ended like it, with
    `split_from` set. Counters and times of both are recomputed."""
    account_id, shop_id = service.slot_of(session_id)

    def work(tx: SlotTx) -> SplitOutcome:
        head = _lock_on_slot(tx, [session_id])[session_id]
        _refuse_occupant(head, "split")
        _refuse_unless_ended(head, "split")
        cut = tx.db.execute(
            select(MESSAGES.c.id, MESSAGES.c.sent_at, MESSAGES.c.session_pk)
            .where(MESSAGES.c.message_id == at_message_id)).one_or_none()
        if cut is None or cut.session_pk != head.id:
            raise ValidationFailed(
                f"message {at_message_id} is not a message of session {session_id}",
                [{"field": "at_message_id",
                  "message": f"not a message of session {session_id}"}])
        from_cut = or_(MESSAGES.c.sent_at > cut.sent_at,
                       and_(MESSAGES.c.sent_at == cut.sent_at, MESSAGES.c.id >= cut.id))
        before = tx.db.execute(select(func.count()).where(
            MESSAGES.c.session_pk == head.id, ~from_cut)).scalar_one()
        if not before:
            raise CorrectionRefused(
                f"message {at_message_id} is the first of session {session_id}: a cut "
                "there would leave it without messages", session_id=session_id)
        tail = _new_tail(head, reason=reason)
        tx.insert_session(tail)
        moved = affected_rows(tx.db.execute(
            update(MESSAGES).where(MESSAGES.c.session_pk == head.id, from_cut)
            .values(session_pk=tail.id)))
        later = and_(TRANSFERS.c.session_pk == head.id, TRANSFERS.c.created_at >= cut.sent_at)
        transfers = list(tx.db.execute(
            select(TRANSFERS.c.transfer_id).where(later).order_by(TRANSFERS.c.id)).scalars())
        if transfers:
            tx.db.execute(update(TRANSFERS).where(later).values(
                session_pk=tail.id, session_id=tail.session_id))
        tallies = _tally(tx, [head.id, tail.id])
        _apply_tally(head, tallies.get(head.id, _Tally()))
        _apply_tally(tail, tallies.get(tail.id, _Tally()))
        _split_times(head, tail)
        common = {"at_message_id": at_message_id, "messages": moved, "transfers": transfers,
                  "operator": operator}
        tx.audit(head, AuditOperation.SPLIT, from_status=head.status, reason=reason,
                 details={"split_into": tail.session_id, **common,
                          "message_count": head.message_count})
        tx.audit(tail, AuditOperation.SPLIT, from_status=None, reason=reason,
                 details={"split_from": head.session_id, **common})
        tx.event(EventType.SESSION_SPLIT, head, {
            "split_into": tail.session_id, "at_message_id": at_message_id,
            "messages_moved": moved, "message_count": head.message_count, "reason": reason})
        tx.event(EventType.SESSION_SPLIT, tail, {
            "split_from": head.session_id, "at_message_id": at_message_id,
            "message_count": tail.message_count, "reason": reason})
        tx.db.flush()
        return SplitOutcome(session=SessionView.model_validate(head),
                            new_session=SessionView.model_validate(tail),
                            messages_moved=moved, transfers_moved=transfers)

    return service.run_on_slot(account_id, shop_id, actor, work)


# ---- the steps ---------------------------------------------------------------------------
def _lock_on_slot(tx: SlotTx, session_ids: Sequence[str]) -> dict[str, Session]:
    """The sessions, their rows locked for this transaction in primary-key order (two
    transactions locking overlapping sets never wait for each other in a cycle). 404 for
    an unknown id, 409 for a session of another slot."""
    slots = {row.session_id: row for row in tx.db.execute(
        select(Session.id, Session.session_id, Session.account_id, Session.shop_id)
        .where(Session.session_id.in_(list(session_ids)))).all()}
    for sid in session_ids:
        row = slots.get(sid)
        if row is None:
            raise NotFound(f"session {sid} not found")
        if (row.account_id, row.shop_id) != (tx.account_id, tx.shop_id):
            raise CorrectionRefused(
                f"session {sid} is on slot ({row.account_id}, {row.shop_id}), not on "
                f"({tx.account_id}, {tx.shop_id}): only sessions of one slot can be merged",
                session_id=sid)
    ordered = sorted(slots.values(), key=lambda r: r.id)
    return {row.session_id: tx.load(row.session_id) for row in ordered}


def _refuse_occupant(session: Session, what: str) -> None:
    if session.status.occupies_slot:
        raise CorrectionRefused(
            f"cannot {what} session {session.session_id}: it occupies the slot "
            f"({session.status}); end it first", session_id=session.session_id,
            current_status=str(session.status))


def _refuse_unless_ended(session: Session, what: str) -> None:
    if not session.status.is_terminal:
        raise CorrectionRefused(
            f"session {session.session_id} is {session.status}: only an ended session "
            f"(COMPLETED, CANCELLED, TIMEOUT) can be {what}", session_id=session.session_id,
            current_status=str(session.status))
    if session.merged_into:
        raise CorrectionRefused(
            f"session {session.session_id} was already merged into {session.merged_into}",
            session_id=session.session_id, merged_into=session.merged_into)


def _tally(tx: SlotTx, pks: Sequence[int]) -> dict[int, _Tally]:
    """Counters and first/last times of these sessions, from the messages they hold now
    (one grouped read on the (session_pk, sent_at) index)."""
    tallies: dict[int, _Tally] = {}
    for pk, role, n, first, last in tx.db.execute(
            select(MESSAGES.c.session_pk, MESSAGES.c.sender_role, func.count(),
                   func.min(MESSAGES.c.sent_at), func.max(MESSAGES.c.sent_at))
            .where(MESSAGES.c.session_pk.in_(list(pks)))
            .group_by(MESSAGES.c.session_pk, MESSAGES.c.sender_role)).all():
        tally = tallies.setdefault(pk, _Tally())
        tally.count += n
        if role == SenderRole.ROBOT:
            tally.robot += n
        elif role == SenderRole.HUMAN:
            tally.human += n
        elif role == SenderRole.COUNTERPART:
            tally.counterpart += n
        tally.first = first if tally.first is None else min(tally.first, first)
        tally.last = last if tally.last is None else max(tally.last, last)
    return tallies


def _apply_tally(session: Session, tally: _Tally) -> None:
    session.message_count = tally.count
    session.robot_message_count = tally.robot
    session.human_message_count = tally.human
    session.counterpart_message_count = tally.counterpart
    session.first_message_at = tally.first
    session.last_message_at = tally.last
    if session.origin == Origin.IMPORT and tally.count:
        # an imported conversation nobody of ours answered (SPEC §4 step 5)
        session.unanswered = tally.robot + tally.human == 0


def _merge_times(target: Session, merged: Sequence[Session]) -> None:
    """An ended `into` spans every conversation merged into it: the earliest start, the
    latest end. (An open one keeps its own times: they decide its precedence and its
    deadline.)"""
    everyone = (target, *merged)
    target.created_at = min(s.created_at for s in everyone)
    target.requested_at = min(s.requested_at for s in everyone)
    activated = [s.activated_at for s in everyone if s.activated_at is not None]
    target.activated_at = min(activated) if activated else None
    ended = [s.ended_at for s in everyone if s.ended_at is not None]
    target.ended_at = max(ended) if ended else target.ended_at
    target.last_activity_at = max(s.last_activity_at for s in everyone)


def _new_tail(head: Session, *, reason: str) -> Session:
    """The new session of a split: same slot, type, owner and origin, ended like `head`
    (its times are set from its messages once they have moved)."""
    return Session(
        session_id=new_id("ses"), account_id=head.account_id, shop_id=head.shop_id,
        session_type=head.session_type, task_type=head.task_type, priority=head.priority,
        status=head.status, holds_slot=None, pause_cause=None, owner_id=head.owner_id,
        client_id=head.client_id, assigned_agent_id=head.assigned_agent_id,
        origin=head.origin, created_at=head.created_at, requested_at=head.requested_at,
        activated_at=head.activated_at, ended_at=head.ended_at,
        last_activity_at=head.last_activity_at, deadline_at=None, message_count=0,
        robot_message_count=0, human_message_count=0, counterpart_message_count=0,
        reason=reason, end_reason=head.end_reason, result=head.result, context=head.context,
        unanswered=False, split_from=head.session_id,
    )


def _split_times(head: Session, tail: Session) -> None:
    """The new session starts at its first message and ends where `head` ended; `head`
    now ends at its last message (never before it started)."""
    assert tail.first_message_at is not None and head.last_message_at is not None
    tail.created_at = tail.requested_at = tail.activated_at = tail.first_message_at
    end = head.ended_at or head.last_activity_at
    tail.ended_at = max(end, tail.last_message_at or end)
    tail.last_activity_at = max(head.last_activity_at, tail.ended_at)
    started = head.activated_at or head.created_at
    head.ended_at = max(head.last_message_at, started)
    head.last_activity_at = head.ended_at
