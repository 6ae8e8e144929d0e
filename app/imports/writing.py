"""Writing an import's rows (SPEC §4 step 7): a transaction's new closed sessions,
their audit rows and hand-off transfers, and every message, in a few bulk statements
(`app.fastsql.core_insert`), plus the counters of the sessions they land on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from app.audit.models import Operation
from app.audit.operations import AuditOperation
from app.audit.trail import last_hashes, operation_values
from app.fastsql import core_insert
from app.ids import new_id
from app.imports.counts import ImportCounts
from app.imports.dedup import ID_BATCH
from app.imports.planning import Known, NewSession
from app.imports.rows import Msg
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import Origin, Priority, SenderRole, SessionStatus
from app.sessions.models import Session
from app.transfers.enums import TransferStatus, TransferTrigger
from app.transfers.models import Transfer, transfer_values

S = SessionStatus


def message_values(msg: Msg, session_pk: int, now: datetime, job_id: str | None
                   ) -> dict[str, Any]:
    return {
        "message_id": msg.message_id, "session_pk": session_pk, "account_id": msg.account_id,
        "shop_id": msg.shop_id, "sender_role": str(msg.sender_role), "sender_id": msg.sender_id,
        "content": msg.content, "message_type": msg.message_type, "sent_at": msg.sent_at,
        "received_at": now, "import_job_id": job_id,
    }


def count_roles(messages: Sequence[Msg]) -> dict[SenderRole, int]:
    counts = dict.fromkeys(SenderRole, 0)
    for m in messages:
        counts[m.sender_role] += 1
    return counts


def add_to_session(session: Session, messages: Sequence[Msg]) -> None:
    """Counters and message times of `session` after `messages` were stored on it."""
    roles = count_roles(messages)
    session.message_count = (session.message_count or 0) + len(messages)
    session.robot_message_count = (session.robot_message_count or 0) + roles[SenderRole.ROBOT]
    session.human_message_count = (session.human_message_count or 0) + roles[SenderRole.HUMAN]
    session.counterpart_message_count = (
        (session.counterpart_message_count or 0) + roles[SenderRole.COUNTERPART]
    )
    first = min(m.sent_at for m in messages)
    last = max(m.sent_at for m in messages)
    if session.first_message_at is None or first < session.first_message_at:
        session.first_message_at = first
    if session.last_message_at is None or last > session.last_message_at:
        session.last_message_at = last
    if session.origin == Origin.IMPORT and session.status.is_terminal and (
        session.ended_at is None or last > session.ended_at
    ):
        session.ended_at = last


class Writer:
    """Collects one transaction's rows and writes them with a few bulk statements."""

    def __init__(self, db: DbSession, *, now: datetime, actor: str, job_id: str | None,
                 batch: int | None = None) -> None:
        self.db = db
        self.now = now
        self.actor = actor
        self.job_id = job_id
        self.batch = batch  # rows per INSERT (BATCH_SIZE), None: no bound
        self.counts = ImportCounts()
        self._sessions: list[tuple[dict[str, Any], NewSession]] = []
        self._messages: list[tuple[Msg, int | str]] = []  # session pk, or public id if new
        self._attached: dict[int, list[Msg]] = defaultdict(list)

    # closed (historical) sessions: no slot, no events
    def closed_session(self, plan: NewSession) -> None:
        msgs = plan.messages
        roles = count_roles(msgs)
        public = new_id("ses")
        first = msgs[0]
        values = {
            "session_id": public, "account_id": first.account_id, "shop_id": first.shop_id,
            "session_type": str(plan.session_type), "task_type": str(plan.task_type),
            "priority": int(rules.default_priority(plan.session_type, plan.task_type)),
            "status": S.COMPLETED, "holds_slot": None, "pause_cause": None,
            "owner_id": plan.owner_id,
            "assigned_agent_id": plan.owner_id if plan.session_type.is_human else None,
            "origin": Origin.IMPORT, "created_at": plan.start, "requested_at": plan.start,
            "activated_at": plan.start, "ended_at": plan.end, "last_activity_at": plan.end,
            "deadline_at": None, "message_count": len(msgs),
            "robot_message_count": roles[SenderRole.ROBOT],
            "human_message_count": roles[SenderRole.HUMAN],
            "counterpart_message_count": roles[SenderRole.COUNTERPART],
            "first_message_at": plan.start, "last_message_at": plan.end,
            "end_reason": "history import", "unanswered": plan.unanswered,
            "reason": "history import",
            "started_by": str(plan.started_by) if plan.started_by else None,
            "thread_id": plan.thread_id,
        }
        self._sessions.append((values, plan))
        self._messages.extend((m, public) for m in msgs)
        self.counts.sessions_created += 1

    def attach_closed(self, target: Known, messages: list[Msg]) -> None:
        self._attached[target.pk].extend(messages)

    def flush(self) -> None:
        db = self.db
        public_to_pk: dict[str, int] = {}
        if self._sessions:
            # Each session's one audit row is made first, so that its hash, the chain
            # head, is inserted with the session; primary keys are filled in after.
            audits, transfers = [], []
            for values, plan in self._sessions:
                pk = 0
                details: dict[str, Any] = {
                    "job_id": self.job_id, "messages": len(plan.messages),
                    "first_message_at": plan.start.isoformat(),
                    "last_message_at": plan.end.isoformat(),
                }
                if plan.unanswered:
                    details["unanswered"] = True
                if plan.handoff_at is not None:
                    transfer = handoff_transfer(values, pk, plan.messages, plan.handoff_at,
                                                ended_at=plan.end, closed=True)
                    transfers.append(transfer)
                    details["transfer_id"] = transfer["transfer_id"]
                audits.append(operation_values(
                    session_pk=pk, session_id=values["session_id"], operation=AuditOperation.IMPORT,
                    from_status=None, to_status=S.COMPLETED, actor=self.actor, at=self.now,
                    prev_hash=None, reason="history import", details=details,
                ))
                values["audit_head"] = audits[-1]["row_hash"]
            core_insert(db, Session, [values for values, _ in self._sessions], batch=self.batch)
            ids = [values["session_id"] for values, _ in self._sessions]
            for i in range(0, len(ids), ID_BATCH):
                public_to_pk.update(dict(db.execute(
                    select(Session.session_id, Session.id)
                    .where(Session.session_id.in_(ids[i:i + ID_BATCH]))
                ).all()))
            for row in (*audits, *transfers):
                row["session_pk"] = public_to_pk[row["session_id"]]
            core_insert(db, Operation, audits, batch=self.batch)
            if transfers:
                core_insert(db, Transfer, transfers, batch=self.batch)
        if self._attached:
            pks = sorted(self._attached)
            rows = {s.id: s for s in db.execute(
                select(Session).where(Session.id.in_(pks)).with_for_update()
            ).scalars()}
            prev_hashes = last_hashes(db, pks)
            handed_over = self._sessions_with_transfers(pks)
            audits, transfers = [], []
            for pk in pks:
                session, msgs = rows[pk], self._attached[pk]
                self._messages.extend((m, pk) for m in msgs)
                add_to_session(session, msgs)
                details = {"job_id": self.job_id, "messages": len(msgs)}
                # Staff found on an ended robot session that never went to a person: the
                # same hand-off as inside a new segment (§4 step 5), recorded once.
                staff_at = next((i for i, m in enumerate(msgs)
                                 if m.sender_role == SenderRole.HUMAN), None)
                if (staff_at is not None and pk not in handed_over
                        and session.session_type.is_robot):
                    transfer = handoff_transfer(session, pk, msgs, staff_at,
                                                ended_at=session.ended_at, closed=True)
                    transfers.append(transfer)
                    details["transfer_id"] = transfer["transfer_id"]
                audits.append(operation_values(
                    session_pk=pk, session_id=session.session_id,
                    operation=AuditOperation.IMPORT_MESSAGES,
                    from_status=session.status, to_status=session.status, actor=self.actor,
                    at=self.now, prev_hash=prev_hashes.get(pk), reason="history import",
                    details=details,
                ))
                session.audit_head = audits[-1]["row_hash"]  # rides on the session's UPDATE
                self.counts.sessions_updated += 1
            core_insert(db, Operation, audits, batch=self.batch)
            if transfers:
                core_insert(db, Transfer, transfers, batch=self.batch)
        if self._messages:
            message_rows = [
                message_values(m, public_to_pk[ref] if isinstance(ref, str) else ref,
                               self.now, self.job_id)
                for m, ref in self._messages
            ]
            core_insert(db, Message, message_rows, batch=self.batch)
            self.counts.inserted += len(message_rows)
        db.flush()


    def _sessions_with_transfers(self, pks: Sequence[int]) -> set[int]:
        found: set[int] = set()
        for i in range(0, len(pks), ID_BATCH):
            found.update(self.db.execute(
                select(Transfer.session_pk).where(Transfer.session_pk.in_(pks[i:i + ID_BATCH]))
            ).scalars())
        return found


def handoff_transfer(session: dict[str, Any] | Session, session_pk: int,
                     messages: Sequence[Msg], handoff_at: int, *, ended_at: datetime | None,
                     closed: bool) -> dict[str, Any]:
    """The transfer record of a robot→staff hand-off found in history (trigger `history`):
    `messages[handoff_at]` is the first staff message after the robot's. Its `history`
    is a reference (SPEC §3.6: the conversation history, or a reference to it): the
    session and the ids of the up to 10 messages before the hand-off, which are stored
    with that session in the same transaction; a copy of their texts made every
    hand-off of an import cost about a tenth of its work."""
    staff = messages[handoff_at]
    public = session["session_id"] if isinstance(session, dict) else session.session_id
    recent = messages[max(0, handoff_at - 10):handoff_at]
    return transfer_values(
        session_pk=session_pk, session_id=public,
        status=TransferStatus.COMPLETED if closed else TransferStatus.ACCEPTED,
        urgency=int(Priority.HIGH), reason="hand-off found in imported history",
        trigger=TransferTrigger.HISTORY, offered_agent_id=staff.sender_id,
        agent_id=staff.sender_id,
        history={"session_id": public, "recent_message_ids": [m.message_id for m in recent]},
        at=staff.sent_at, expires_at=None, accepted_at=staff.sent_at,
        ended_at=ended_at if closed else None)
