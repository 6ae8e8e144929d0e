"""What operations staff can see and do (SPEC §7, the `/admin/api` row of §8).

Plain Python over a database session and the `SessionService`: no Flask here, so the
admin API, the console pages and tests all call the same functions. Reads are single
queries on indexed columns; writes go through `SessionService.run_on_session` /
`run_on_slot`, so a force-close or a slot release takes the slot lock, advances the
fence, promotes the next waiting session and writes its audit row and outbox event
in one transaction — exactly like every other change to a slot.
"""

from __future__ import annotations

import math
import random
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, ConfigDict, Field, field_validator
from sqlalchemy import delete, func, select, union, update
from sqlalchemy.orm import Session as DbSession

from admin.models import ConsoleLogin
from app.audit.models import Operation
from app.audit.trail import check_chain
from app.clients.models import ApiClient
from app.clients.service import hash_token
from app.db import Database, utcnow
from app.errors import Conflict, NotFound
from app.events.models import Event
from app.imports.models import ImportChunk, ImportJob, ImportUploadPart
from app.imports.service import ImportJobView
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import Origin, PauseCause, SessionStatus, SessionType
from app.sessions.models import Session, Slot
from app.sessions.queries import decode_cursor, encode_cursor
from app.sessions.schemas import SessionView
from app.sessions.service import SessionService
from app.sessions.slot_tx import SlotTx, precedence_of
from app.transfers.enums import TransferStatus, TransferTrigger
from app.transfers.models import Transfer
from app.transfers.schemas import TransferView
from app.validation import BoundaryModel

MAX_PAGE = 200
# Integer cursors and offsets are row ids or positions: they fit a signed 64-bit column, so
# anything larger is malformed (and would overflow the database driver, a 500).
MAX_CURSOR = 2**63 - 1
MAX_MESSAGES = 500
MAX_VERIFY_SESSIONS = 10_000
DEFAULT_VERIFY_SESSIONS = 1_000
HOURS = 24
# A conflict is a request that met an occupied slot (SPEC §3.5): it preempted or
# interrupted the occupant (these audit operations), or it had to wait in line (the
# `session.queued` event of a create or a resume). Rejected requests create nothing
# and so are not counted.
CONFLICT_OPERATIONS = ("preempt", "interrupt")
QUEUED_EVENT = "session.queued"
FINISHED_IMPORT_STATUSES = ("succeeded", "partially_succeeded", "failed")


# ---- query models ----------------------------------------------------------------------
def _as_utc(value: datetime | None) -> datetime | None:
    """Naive times in a query are UTC (the API speaks UTC everywhere); a time whose UTC
    falls outside years 1..9999 (`9999-12-31T23:59-05:00`) is refused, not a 500."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC) if value is not None else None
    except OverflowError:
        raise ValueError("out of range once converted to UTC") from None


UtcTime = Annotated[datetime | None, AfterValidator(_as_utc)]


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _blank_none(value: Any) -> Any:
    """Empty form fields (the console's search form sends them) mean "no filter"."""
    return None if isinstance(value, str) and not value.strip() else value


class SessionSearch(BoundaryModel):
    """Filters of the admin session search; enumerations are case-insensitive, times UTC."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    account_id: str | None = Field(default=None, max_length=64)
    shop_id: str | None = Field(default=None, max_length=64)
    status: SessionStatus | None = None
    session_type: SessionType | None = Field(
        default=None, validation_alias=AliasChoices("session_type", "type")
    )
    owner_id: str | None = Field(default=None, max_length=64)
    origin: Origin | None = None
    created_from: UtcTime = Field(
        default=None, validation_alias=AliasChoices("created_from", "from"),
        description="created at or after (ISO 8601; naive = UTC)",
    )
    created_to: UtcTime = Field(
        default=None, validation_alias=AliasChoices("created_to", "to"),
        description="created before (ISO 8601; naive = UTC)",
    )
    after: str | None = Field(default=None, max_length=64, description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator(
        "account_id", "shop_id", "status", "session_type", "owner_id", "origin",
        "created_from", "created_to", "after", mode="before",
    )(_blank_none)

    @field_validator("status", "session_type", mode="before")
    @classmethod
    def _upper_enums(cls, value: Any) -> Any:
        return _upper(_blank_none(value))

    @field_validator("origin", mode="before")
    @classmethod
    def _lower_origin(cls, value: Any) -> Any:
        return _lower(_blank_none(value))


class AuditSearch(BoundaryModel):
    """Filters of the audit log search (SPEC §7: "searchable in the admin API")."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    session_id: str | None = Field(default=None, max_length=40)
    actor: str | None = Field(default=None, max_length=128)
    operation: str | None = Field(default=None, max_length=32)
    created_from: UtcTime = Field(default=None, validation_alias=AliasChoices("created_from",
                                                                              "from"))
    created_to: UtcTime = Field(default=None, validation_alias=AliasChoices("created_to", "to"))
    after: int | None = Field(default=None, ge=1, le=MAX_CURSOR,
                              description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class VerifyRange(BoundaryModel):
    """Which chains to verify: sessions with audit rows in [from, to), all or a sample."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    created_from: UtcTime = Field(default=None, validation_alias=AliasChoices("created_from",
                                                                              "from"))
    created_to: UtcTime = Field(default=None, validation_alias=AliasChoices("created_to", "to"))
    sample: int | None = Field(default=None, ge=1, le=MAX_VERIFY_SESSIONS,
                               description="verify this many sessions picked at random")
    limit: int = Field(default=DEFAULT_VERIFY_SESSIONS, ge=1, le=MAX_VERIFY_SESSIONS)

    _blank = field_validator("*", mode="before")(_blank_none)


class PageQuery(BoundaryModel):
    """A plain newest-first page over an integer key."""

    model_config = ConfigDict(extra="ignore")

    after: int | None = Field(default=None, ge=1, le=MAX_CURSOR,
                              description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class DeliveryQuery(PageQuery):
    client_id: str | None = Field(default=None, max_length=40)
    status: Literal["pending", "delivered", "failed"] | None = Field(
        default=None, description="`failed`: the given-up deliveries (redeliverable)")
    session_id: str | None = Field(default=None, max_length=40)

    @field_validator("status", mode="before")
    @classmethod
    def _any_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class Redelivery(BoundaryModel):
    """Body of a redelivery (optional): why, kept in the session's audit row."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="redelivered by operator", min_length=1, max_length=255)


class ImportListQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    after: str | None = Field(default=None, max_length=40, description="cursor from `next`")
    status: str | None = Field(default=None, max_length=24)
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _blank = field_validator("*", mode="before")(_blank_none)


class OffsetQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    offset: int = Field(default=0, ge=0, le=MAX_CURSOR)
    limit: int = Field(default=100, ge=1, le=1000)


class SlotQuery(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    account_id: str = Field(min_length=1, max_length=64)
    shop_id: str = Field(min_length=1, max_length=64)

    @field_validator("account_id", "shop_id", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return str(value).strip() if isinstance(value, int | str) else value


class OperatorAction(BoundaryModel):
    """Body of a force action: why the operator did it (kept in the audit row)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="closed by operator", min_length=1, max_length=255)


class SlotRelease(SlotQuery, OperatorAction):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="slot released by operator", min_length=1, max_length=255)


class ClientCreate(BoundaryModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    role: str = Field(description="bot, desk or admin")
    webhook_url: str | None = Field(default=None, max_length=1024)


# ---- sessions ---------------------------------------------------------------------------
def session_json(row: Session) -> dict[str, Any]:
    return SessionView.model_validate(row).model_dump(mode="json")


def transfer_json(row: Transfer) -> dict[str, Any]:
    return TransferView.model_validate(row).model_dump(mode="json", exclude={"history"})


def search_sessions(
    db: DbSession, search: SessionSearch
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated on the internal id (stable while rows arrive)."""
    stmt = select(Session)
    for column, value in (
        (Session.account_id, search.account_id),
        (Session.shop_id, search.shop_id),
        (Session.status, search.status),
        (Session.session_type, search.session_type),
        (Session.owner_id, search.owner_id),
        (Session.origin, search.origin),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if search.created_from is not None:
        stmt = stmt.where(Session.created_at >= search.created_from)
    if search.created_to is not None:
        stmt = stmt.where(Session.created_at < search.created_to)
    if search.after:
        stmt = stmt.where(Session.id < decode_cursor(search.after))
    rows = db.execute(stmt.order_by(Session.id.desc()).limit(search.limit + 1)).scalars().all()
    page = rows[: search.limit]
    following = encode_cursor(page[-1].id) if len(rows) > search.limit else None
    return [session_json(r) for r in page], following


def load_session(db: DbSession, session_id: str) -> Session:
    row = db.execute(select(Session).where(Session.session_id == session_id)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"session {session_id} not found")
    return row


def operation_json(row: Operation) -> dict[str, Any]:
    return {
        "id": row.id,
        "session_id": row.session_id,
        "operation": row.operation,
        "from_status": row.from_status,
        "to_status": row.to_status,
        "actor": row.actor,
        "reason": row.reason,
        "details": row.details,
        "created_at": row.created_at.isoformat(),
        "row_hash": row.row_hash,
    }


def message_json(row: Message) -> dict[str, Any]:
    return {
        "message_id": row.message_id,
        "sender_role": str(row.sender_role),
        "sender_id": row.sender_id,
        "content": row.content,
        "message_type": row.message_type,
        "sent_at": row.sent_at.isoformat(),
        "received_at": row.received_at.isoformat(),
        "posted_by": row.posted_by,
        "agent_id": row.agent_id,
        "import_job_id": row.import_job_id,
    }


def session_detail(db: DbSession, session_id: str) -> dict[str, Any]:
    """One session with its conversation, transfers and audit trail, and the three merged
    into one timeline (oldest first) — what an operator reads to understand a case."""
    session = load_session(db, session_id)
    messages = db.execute(
        select(Message).where(Message.session_pk == session.id)
        .order_by(Message.sent_at.desc(), Message.id.desc()).limit(MAX_MESSAGES + 1)
    ).scalars().all()
    truncated = len(messages) > MAX_MESSAGES
    messages = list(reversed(messages[:MAX_MESSAGES]))
    transfers = db.execute(
        select(Transfer).where(Transfer.session_pk == session.id).order_by(Transfer.id)
    ).scalars().all()
    audit = db.execute(
        select(Operation).where(Operation.session_pk == session.id).order_by(Operation.id)
    ).scalars().all()

    timeline: list[dict[str, Any]] = []
    for op in audit:
        timeline.append({"at": op.created_at, "kind": "audit", "operation": op.operation,
                         "from_status": op.from_status, "to_status": op.to_status,
                         "actor": op.actor, "reason": op.reason, "details": op.details})
    for m in messages:
        timeline.append({"at": m.sent_at, "kind": "message", "sender_role": str(m.sender_role),
                         "sender_id": m.sender_id, "content": m.content})
    for t in transfers:
        for label, at in (("offered", t.created_at), ("accepted", t.accepted_at),
                          (str(t.status).lower(), t.ended_at)):
            if at is not None:
                timeline.append({"at": at, "kind": "transfer", "transfer_id": t.transfer_id,
                                 "event": label, "urgency": t.urgency, "reason": t.reason,
                                 "agent_id": t.agent_id or t.offered_agent_id})
    # Stable: audit rows keep their chain order when they share a timestamp.
    timeline.sort(key=lambda item: item["at"])
    for item in timeline:
        item["at"] = item["at"].isoformat()
    return {
        "session": session_json(session),
        "messages": [message_json(m) for m in messages],
        "messages_truncated": truncated,
        "transfers": [transfer_json(t) for t in transfers],
        "audit": [operation_json(op) for op in audit],
        "timeline": timeline,
    }


def search_audit(db: DbSession, search: AuditSearch) -> tuple[list[dict[str, Any]], int | None]:
    """Audit rows newest first; `next` is the last row id of the page."""
    stmt = select(Operation)
    if search.session_id:
        stmt = stmt.where(Operation.session_id == search.session_id)
    if search.actor:
        stmt = stmt.where(Operation.actor == search.actor)
    if search.operation:
        stmt = stmt.where(Operation.operation == search.operation)
    if search.created_from is not None:
        stmt = stmt.where(Operation.created_at >= search.created_from)
    if search.created_to is not None:
        stmt = stmt.where(Operation.created_at < search.created_to)
    if search.after:
        stmt = stmt.where(Operation.id < search.after)
    rows = db.execute(stmt.order_by(Operation.id.desc()).limit(search.limit + 1)).scalars().all()
    page = rows[: search.limit]
    return [operation_json(r) for r in page], (page[-1].id if len(rows) > search.limit else None)


# ---- the audit chain ---------------------------------------------------------------------
def verify_session_chain(db: DbSession, session_id: str) -> dict[str, Any]:
    session = load_session(db, session_id)
    check = check_chain(db, session.id)
    return {"session_id": session_id, "intact": check.intact,
            "first_bad_row_id": check.first_bad_row_id, "rows_checked": check.rows_checked,
            "head_matches": check.head_matches}


def verify_chains(db: DbSession, request: VerifyRange) -> dict[str, Any]:
    """Verify every session with audit rows in the range (up to `limit`), or a random
    `sample` of them. Answers which chains are broken and where."""
    by_rows = select(Operation.session_pk.label("session_pk"))
    # A session whose rows were all deleted has none in the range: its anchored head
    # still names it, found by when it was created.
    by_head = select(Session.id.label("session_pk")).where(Session.audit_head.is_not(None))
    if request.created_from is not None:
        by_rows = by_rows.where(Operation.created_at >= request.created_from)
        by_head = by_head.where(Session.created_at >= request.created_from)
    if request.created_to is not None:
        by_rows = by_rows.where(Operation.created_at < request.created_to)
        by_head = by_head.where(Session.created_at < request.created_to)
    candidates_of = union(by_rows, by_head).subquery()
    stmt = select(candidates_of.c.session_pk)
    if request.sample is not None:
        # A sample is drawn from the range's sessions; drawing happens in Python over
        # ids only, so it is the same SQL on SQLite and MySQL.
        candidates = list(db.execute(stmt.limit(MAX_VERIFY_SESSIONS * 10)).scalars())
        chosen = random.sample(candidates, min(request.sample, len(candidates)))
        truncated = False
    else:
        chosen = list(db.execute(stmt.order_by(candidates_of.c.session_pk)
                                 .limit(request.limit + 1)).scalars())
        truncated = len(chosen) > request.limit
        chosen = chosen[: request.limit]
    broken: list[dict[str, Any]] = []
    rows_checked = 0
    for session_pk in chosen:
        check = check_chain(db, session_pk)
        rows_checked += check.rows_checked
        if not check.intact:
            public_id = db.execute(
                select(Session.session_id).where(Session.id == session_pk)
            ).scalar_one_or_none()
            broken.append({"session_id": public_id,
                           "first_bad_row_id": check.first_bad_row_id,
                           "head_matches": check.head_matches})
    return {
        "intact": not broken,
        "sessions_checked": len(chosen),
        "rows_checked": rows_checked,
        "broken": broken,
        "truncated": truncated,
        "sampled": request.sample is not None,
    }


# ---- the slot ------------------------------------------------------------------------------
def slot_view(db: DbSession, account_id: str, shop_id: str) -> dict[str, Any]:
    """The occupant and the waiting line in precedence order (the order promotion uses);
    sessions paused by their owner wait for their owner, not for the slot, and are listed
    apart."""
    rows = db.execute(
        select(Session).where(
            Session.account_id == account_id,
            Session.shop_id == shop_id,
            Session.status.in_([SessionStatus.ACTIVE, SessionStatus.TRANSFERRED,
                                SessionStatus.PENDING, SessionStatus.PAUSED]),
        )
    ).scalars().all()
    slot = db.get(Slot, (account_id, shop_id))
    if slot is None and not rows:
        raise NotFound(f"slot ({account_id}, {shop_id}) has never been used")
    occupant = next((r for r in rows if r.holds_slot), None)
    waiting = sorted(
        (r for r in rows if r.status in (SessionStatus.PENDING, SessionStatus.PAUSED)
         and r.pause_cause != PauseCause.OWNER),
        key=precedence_of,
    )
    owner_paused = [r for r in rows if r.status == SessionStatus.PAUSED
                    and r.pause_cause == PauseCause.OWNER]

    def queued(position: int, row: Session) -> dict[str, Any]:
        rank = precedence_of(row)
        return {**session_json(row), "position": position,
                "precedence": {"human": not rank.robot, "priority": rank.priority,
                               "type_rank": rank.type_rank,
                               "requested_at": rank.requested_at.isoformat()}}

    return {
        "account_id": account_id,
        "shop_id": shop_id,
        "fence": slot.fence if slot else 0,
        "occupant": session_json(occupant) if occupant else None,
        "waiting": [queued(i + 1, r) for i, r in enumerate(waiting)],
        "paused_by_owner": [session_json(r) for r in owner_paused],
    }


def force_close(
    service: SessionService, session_id: str, *, actor: str, reason: str, operator: str
) -> dict[str, Any]:
    """End a session now (CANCELLED), whatever its owner thinks, and promote the next
    waiting session if it held the slot. The audit row names the operator."""

    def work(tx: SlotTx, session: Session) -> dict[str, Any]:
        rules.check_transition(SessionStatus(session.status), SessionStatus.CANCELLED)
        held = bool(session.holds_slot)
        tx.cancel_open_transfers(session, reason=f"force-closed: {reason}")
        tx.leave_slot(session, SessionStatus.CANCELLED, operation="force-close",
                      event="session.cancelled", reason=reason,
                      details={"operator": operator, "forced": True})
        promoted = tx.occupant() if held else None
        return {"session": session_json(session),
                "promoted": session_json(promoted) if promoted else None}

    return service.run_on_session(session_id, actor, work)


def release_slot(
    service: SessionService, account_id: str, shop_id: str, *, actor: str, reason: str,
    operator: str,
) -> dict[str, Any]:
    """Free a slot: the occupant ends CANCELLED (its open transfer cancelled) and the
    highest-precedence waiting session is activated. A slot that is already free but has
    sessions waiting (which the rules never leave behind) gets its next session promoted."""

    def work(tx: SlotTx) -> dict[str, Any]:
        occupant = tx.occupant()
        released = None
        if occupant is not None:
            tx.cancel_open_transfers(occupant, reason=f"slot released: {reason}")
            tx.leave_slot(occupant, SessionStatus.CANCELLED, operation="release-slot",
                          event="session.cancelled", reason=reason,
                          details={"operator": operator, "forced": True})
            released = session_json(occupant)
            promoted = tx.occupant()
        else:
            promoted = tx.promote_next_waiting()
        if released is None and promoted is None:
            raise Conflict(f"slot ({account_id}, {shop_id}) is free and nobody waits for it")
        return {"account_id": account_id, "shop_id": shop_id, "released": released,
                "promoted": session_json(promoted) if promoted else None}

    return service.run_on_slot(account_id, shop_id, actor, work)


# ---- transfers and agents --------------------------------------------------------------------
def transfer_queue(db: DbSession, *, limit: int = 100,
                   status: TransferStatus = TransferStatus.PENDING) -> list[dict[str, Any]]:
    """Transfers of `status` in desk order (urgency, then age), with their age in seconds.
    ACCEPTED ones (being handled) also say how long they have waited for their first
    human answer (`first_response_wait_seconds`, null once answered), and carry the
    `first_response_overdue` flag (SPEC §12)."""
    now = utcnow()
    rows = db.execute(
        select(Transfer, Session.account_id, Session.shop_id, Session.session_type)
        .join(Session, Session.id == Transfer.session_pk)
        .where(Transfer.status == status)
        .order_by(Transfer.urgency, Transfer.created_at, Transfer.id).limit(limit)
    ).all()
    return [
        {**transfer_json(t), "account_id": account, "shop_id": shop,
         "session_type": str(stype), "age_seconds": (now - t.created_at).total_seconds(),
         "first_response_wait_seconds": (now - t.accepted_at).total_seconds()
         if t.accepted_at is not None and t.first_response_at is None else None}
        for t, account, shop, stype in rows
    ]


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def first_response_figures(db: DbSession, now: datetime) -> dict[str, Any]:
    """First-response time over the last 24 hours (SPEC §12): from the accept to the first
    human message, for transfers answered in that window; the median and p90 are the
    nearest-rank values. `overdue_24h`: transfers flagged in the window; `waiting`:
    accepted transfers still unanswered now. Hand-offs found in imported history (trigger
    `history`) were answered outside the system and are not counted."""
    since = now - timedelta(hours=24)
    live = Transfer.trigger != TransferTrigger.HISTORY
    answered = db.execute(
        select(Transfer.accepted_at, Transfer.first_response_at)
        .where(Transfer.first_response_at >= since, Transfer.accepted_at.is_not(None), live)
    ).all()
    seconds = sorted(max((f - a).total_seconds(), 0.0) for a, f in answered
                     if a is not None and f is not None)
    overdue = db.execute(
        select(func.count()).select_from(Transfer)
        .where(Transfer.first_response_overdue_at >= since)
    ).scalar_one()
    waiting = db.execute(
        select(func.count()).select_from(Transfer)
        .where(Transfer.status == TransferStatus.ACCEPTED, Transfer.first_response_at.is_(None),
               live)
    ).scalar_one()
    return {"answered_24h": len(seconds), "median_s": _percentile(seconds, 0.5),
            "p90_s": _percentile(seconds, 0.9), "overdue_24h": int(overdue),
            "waiting": int(waiting)}


# ---- API clients ---------------------------------------------------------------------------
def client_json(row: ApiClient) -> dict[str, Any]:
    return {
        "client_id": row.client_id,
        "name": row.name,
        "role": row.role,
        "token_prefix": row.token_prefix,
        "webhook_url": row.webhook_url,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "active": row.revoked_at is None,
    }


# ---- console log-ins ------------------------------------------------------------------------
def start_console_login(database: Database, *, client_id: str, token_hash: str,
                        hours: float) -> str:
    """Record a console log-in of `client_id` lasting `hours`; answers the secret for the
    cookie (the table keeps only its SHA-256)."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    with database.unit_of_work() as uow:
        uow.session.add(ConsoleLogin(
            login_id=hash_token(secret), client_id=client_id, token_hash=token_hash,
            created_at=now, expires_at=now + timedelta(hours=hours),
        ))
        uow.commit()
    return secret


def console_login_client(db: DbSession, secret: str) -> ApiClient | None:
    """The admin client behind a console log-in, or None when the log-in ended (log-out),
    expired, or its client was revoked or given another token since — one query."""
    return db.execute(
        select(ApiClient)
        .join(ConsoleLogin, ConsoleLogin.client_id == ApiClient.client_id)
        .where(ConsoleLogin.login_id == hash_token(secret),
               ConsoleLogin.ended_at.is_(None),
               ConsoleLogin.expires_at > utcnow(),
               ApiClient.revoked_at.is_(None),
               ApiClient.token_hash == ConsoleLogin.token_hash,
               ApiClient.role == "admin")
    ).scalar_one_or_none()


def end_console_login(database: Database, secret: str) -> None:
    """Log-out: the log-in stops working at once, wherever its cookie was copied to."""
    with database.unit_of_work() as uow:
        uow.session.execute(
            update(ConsoleLogin)
            .where(ConsoleLogin.login_id == hash_token(secret), ConsoleLogin.ended_at.is_(None))
            .values(ended_at=utcnow())
        )
        uow.commit()


# ---- import jobs ------------------------------------------------------------------------------
def import_progress(view: ImportJobView) -> dict[str, Any]:
    """The import service's job view plus a 0..1 `progress` for the console's bar."""
    body = view.model_dump(mode="json")
    if view.status in FINISHED_IMPORT_STATUSES:
        progress = 1.0
    elif view.total_rows:
        progress = min(1.0, view.processed / view.total_rows)
    else:
        progress = 0.0
    body["progress"] = round(progress, 4)
    body["finished"] = view.status in FINISHED_IMPORT_STATUSES
    return body


def load_import_job(db: DbSession, job_id: str) -> ImportJob:
    job = db.execute(select(ImportJob).where(ImportJob.job_id == job_id)).scalar_one_or_none()
    if job is None:
        raise NotFound(f"import job {job_id} not found")
    return job


class ImportRetry(BoundaryModel):
    """Body of a retry: optionally read the staged upload with another format/encoding
    (the usual reason an upload failed as a whole)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "ndjson", "csv"] | None = None
    encoding: Literal["utf-8", "utf-8-sig", "gbk"] | None = None


def retry_import_job(database: Database, job_id: str, retry: ImportRetry) -> str:
    """Make a job runnable again; the caller enqueues it after this returns (committed).

    - queued/running: nothing to reset; re-dispatching is harmless (prepare re-sends only
      pending chunks, a done chunk is a no-op) and revives a job whose worker died;
    - failed while reading the upload (the staged upload is still there): back to
      `queued` with its counts cleared, optionally with another format/encoding;
    - anything else (succeeded, or ended after its staged rows were discarded): 409,
      upload the file again.
    Answers the status the job had."""
    with database.unit_of_work() as uow:
        db = uow.session
        job = db.execute(
            select(ImportJob).where(ImportJob.job_id == job_id).with_for_update()
        ).scalar_one_or_none()
        if job is None:
            raise NotFound(f"import job {job_id} not found")
        before = job.status
        if before in ("queued", "running"):
            return before
        staged = db.execute(
            select(func.count()).select_from(ImportUploadPart)
            .where(ImportUploadPart.job_pk == job.id)
        ).scalar_one()
        if before != "failed" or not staged:
            raise Conflict(
                f"import job {job_id} is {before}; only a failed job whose upload is still "
                "staged can be retried (upload the file again)",
                current_status=before,
            )
        db.execute(delete(ImportChunk).where(ImportChunk.job_pk == job.id))
        job.status, job.phase = "queued", "queued"
        job.format = retry.format or job.format
        job.encoding = retry.encoding or job.encoding
        job.total_rows = None
        job.staged_rows = job.chunk_count = job.prepare_invalid = 0
        job.prepare_errors = job.errors = None
        job.processed = job.inserted = job.duplicates = job.invalid = 0
        job.sessions_created = job.sessions_updated = job.conflicts = 0
        job.detail = None
        job.finished_at = None
        uow.commit()
        return before


def import_job_errors(db: DbSession, job_id: str, *, offset: int = 0, limit: int = 100
                      ) -> dict[str, Any]:
    """Row errors `{"line", "error"}` sorted by line: refused while splitting the file, and
    refused by the chunks processed so far (all of them once the job has ended)."""
    job = load_import_job(db, job_id)
    errors: list[dict[str, Any]] = list(job.prepare_errors or [])
    for chunk_errors in db.execute(
        select(ImportChunk.errors).where(ImportChunk.job_pk == job.id,
                                         ImportChunk.errors.is_not(None))
    ).scalars():
        errors.extend(chunk_errors or [])
    if not errors and job.errors:
        errors = list(job.errors)
    unique = {(e.get("line"), e.get("error")): e for e in errors}
    ordered = sorted(unique.values(), key=lambda e: (e.get("line") or 0, str(e.get("error"))))
    return {"job_id": job_id, "status": job.status, "total": len(ordered),
            "items": ordered[offset: offset + limit],
            "next": offset + limit if offset + limit < len(ordered) else None}


# ---- statistics -------------------------------------------------------------------------------
def _hour_bucket(db: DbSession, column: Any) -> Any:
    """`YYYY-MM-DD HH` of a UTC datetime column, in the backend's own SQL."""
    if db.get_bind().dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H", column)
    return func.date_format(column, "%Y-%m-%d %H")


def _hourly(db: DbSession, column: Any, since: datetime, *conditions: Any) -> Counter[str]:
    bucket = _hour_bucket(db, column)
    rows = db.execute(
        select(bucket, func.count()).where(column >= since, *conditions).group_by(bucket)
    ).all()
    return Counter({str(key): int(count) for key, count in rows})


def statistics(db: DbSession, *, now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's figures: sessions by status and type, the transfer queue and its age,
    time to accept, and timeouts, conflicts, sessions and transfers per hour over 24 hours."""
    now = (now or utcnow()).astimezone(UTC)
    end_hour = now.replace(minute=0, second=0, microsecond=0)
    since = end_hour - timedelta(hours=HOURS - 1)
    hours = [since + timedelta(hours=i) for i in range(HOURS)]
    keys = [h.strftime("%Y-%m-%d %H") for h in hours]

    by_pair = db.execute(
        select(Session.status, Session.session_type, func.count())
        .group_by(Session.status, Session.session_type)
    ).all()
    by_status: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for status, stype, count in by_pair:
        by_status[str(status)] += count
        by_type[str(stype)] += count

    waiting = db.execute(
        select(func.count(), func.min(Transfer.created_at))
        .where(Transfer.status == TransferStatus.PENDING)
    ).one()
    waiting_times = db.execute(
        select(Transfer.created_at).where(Transfer.status == TransferStatus.PENDING)
        .order_by(Transfer.created_at).limit(10_000)
    ).scalars().all()
    ages = [(now - t).total_seconds() for t in waiting_times]
    accepted = db.execute(
        select(Transfer.created_at, Transfer.accepted_at)
        .where(Transfer.accepted_at.is_not(None), Transfer.accepted_at >= now - timedelta(hours=24))
    ).all()
    accept_seconds = [(a - c).total_seconds() for c, a in accepted if a is not None]

    started = _hourly(db, Session.created_at, since)
    transfers = _hourly(db, Transfer.created_at, since)
    timeouts = _hourly(db, Operation.created_at, since, Operation.operation == "timeout")
    conflicts = _hourly(db, Operation.created_at, since,
                        Operation.operation.in_(CONFLICT_OPERATIONS))
    conflicts.update(_hourly(db, Event.occurred_at, since, Event.type == QUEUED_EVENT))

    finished_jobs = db.execute(
        select(ImportJob.processed, ImportJob.started_at, ImportJob.finished_at, ImportJob.status)
        .where(ImportJob.finished_at.is_not(None),
               ImportJob.finished_at >= now - timedelta(hours=24))
    ).all()
    rows_24h = sum(p or 0 for p, *_ in finished_jobs)
    busy_seconds = sum(  # each job's wall time, from its start to its end
        max((end - (begin or end)).total_seconds(), 0.0)
        for _, begin, end, _ in finished_jobs if end is not None
    )
    running_jobs = db.execute(
        select(func.count()).select_from(ImportJob)
        .where(ImportJob.status.in_(["queued", "running"]))
    ).scalar_one()

    def series(counter: Counter[str]) -> list[int]:
        return [counter.get(k, 0) for k in keys]

    return {
        "generated_at": now.isoformat(),
        "sessions": {
            "total": sum(by_status.values()),
            "by_status": {str(s): by_status.get(str(s), 0) for s in SessionStatus},
            "by_type": {str(t): by_type.get(str(t), 0) for t in SessionType},
            "by_status_and_type": [
                {"status": str(s), "session_type": str(t), "count": c} for s, t, c in by_pair
            ],
        },
        "transfers": {
            "waiting": int(waiting[0]),
            "oldest_waiting_seconds": (now - waiting[1]).total_seconds() if waiting[1] else None,
            "average_waiting_seconds": sum(ages) / len(ages) if ages else None,
            "accepted_24h": len(accept_seconds),
            "average_accept_seconds": (sum(accept_seconds) / len(accept_seconds)
                                       if accept_seconds else None),
        },
        "first_response": first_response_figures(db, now),
        "last_24h": {
            "sessions_started": sum(series(started)),
            "transfers": sum(series(transfers)),
            "timeouts": sum(series(timeouts)),
            "conflicts": sum(series(conflicts)),
        },
        "hourly": {
            "hours": [h.isoformat() for h in hours],
            "sessions_started": series(started),
            "transfers": series(transfers),
            "timeouts": series(timeouts),
            "conflicts": series(conflicts),
        },
        "imports": {
            "jobs_finished_24h": len(finished_jobs),
            "failed_24h": sum(1 for *_, status in finished_jobs if status == "failed"),
            "rows_24h": rows_24h,
            "rows_per_second": rows_24h / busy_seconds if busy_seconds else None,
            "running": int(running_jobs),
        },
    }
