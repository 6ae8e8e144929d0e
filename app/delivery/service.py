"""Webhook delivery from the outbox (SPEC §6).

Two steps per client with a webhook URL, under a per-client run lock:

1. **Fan-out**: events of the client's scope (exactly what its events feed shows:
   `app.events.feed.visible_events`) become
   delivery rows, one per (client, event), unique, so a repeat is harmless. A
   cursor records how far the outbox is settled; events younger than
   `SETTLE_SECONDS` are scanned again next time, because an id allocated early
   can commit late and must not be skipped.
2. **Send**: pending rows in event order. A failed or not-yet-due row blocks the
   later rows of the same session, so a session's events arrive in order; other
   sessions go on. A failure is retried with exponential backoff
   (WEBHOOK_RETRY_BASE · 2^(attempt-1), at most WEBHOOK_RETRY_MAX) until
   WEBHOOK_MAX_ATTEMPTS, then marked failed (and stops blocking). Every attempt is
   recorded for the admin view.

Where a webhook may point is `app.delivery.urlpolicy`: checked when a URL is registered
and again inside every attempt's connection (`app.delivery.transport`), so a name that
re-resolves to a forbidden address fails that attempt like any other failure.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.audit.operations import AuditOperation
from app.clients.models import ApiClient
from app.config import Settings
from app.coordination.run_locks import run_lock
from app.db import utcnow
from app.delivery import signing, urlpolicy
from app.delivery.models import DeliveryStatus, WebhookAttempt, WebhookCursor, WebhookDelivery
from app.delivery.transport import post_webhook
from app.errors import Conflict, NotFound, ValidationFailed
from app.events.feed import visible_events
from app.events.models import Event
from app.ids import new_id
from app.observability.metrics import record_delivery
from app.runtime import Runtime

log = logging.getLogger(__name__)

SETTLE_SECONDS = 60
FAN_OUT_LIMIT = 1000
SEND_LIMIT = 200
USER_AGENT = "auto-session-webhooks/1"

# ---- scope and registration ------------------------------------------------------------
def scope_condition(client: ApiClient) -> Any:
    """Which events a client receives: exactly what its events feed shows."""
    return visible_events(client.client_id, str(client.role))


def webhook_clients(db: DbSession) -> list[ApiClient]:
    return list(db.execute(
        select(ApiClient).where(ApiClient.webhook_url.is_not(None),
                                ApiClient.revoked_at.is_(None))
        .order_by(ApiClient.client_id)
    ).scalars())


def any_webhook(db: DbSession) -> bool:
    """Cheap check for the after-commit hook: is anyone listening at all?"""
    return db.execute(
        select(ApiClient.client_id).where(ApiClient.webhook_url.is_not(None),
                                          ApiClient.revoked_at.is_(None)).limit(1)
    ).first() is not None


@dataclass
class WebhookInfo:
    client_id: str
    url: str | None
    secret: str | None = None  # shown only when it is created or rotated

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"client_id": self.client_id, "url": self.url,
                                "signature_header": signing.SIGNATURE_HEADER,
                                "timestamp_header": signing.TIMESTAMP_HEADER,
                                "delivery_header": signing.DELIVERY_HEADER}
        if self.secret is not None:
            body["secret"] = self.secret
        return body


def register_webhook(
    db: DbSession, client_id: str, url: str | None, *, rotate_secret: bool = False,
    allow_private: bool = False, resolve_timeout: float = 5.0,
) -> WebhookInfo:
    """Set (or clear, with None) a client's webhook URL. A secret is created on first
    registration or on request and returned once; delivery starts from now on.

    The URL must pass the webhook URL policy (`allow_private` is WEBHOOK_ALLOW_PRIVATE);
    it is checked before anything is read or written, so a refusal leaves no trace."""
    if url is not None:
        check_webhook_url(url, allow_private=allow_private, resolve_timeout=resolve_timeout)
    client = db.get(ApiClient, client_id)
    if client is None:
        raise NotFound(f"client {client_id} not found")
    was_listening = client.webhook_url is not None
    client.webhook_url = url
    secret = None
    if url is not None and (client.webhook_secret is None or rotate_secret):
        client.webhook_secret = secret = signing.new_secret()
    if url is not None and not was_listening:
        _start_cursor(db, client_id)
    db.flush()
    return WebhookInfo(client_id, url, secret)


def check_webhook_url(url: str, *, allow_private: bool, resolve_timeout: float) -> None:
    """The registration check as the domain's 422, naming the `url` field."""
    try:
        urlpolicy.check_registration(url, allow_private=allow_private,
                                     resolve_timeout=resolve_timeout)
    except urlpolicy.UrlRefused as exc:
        raise ValidationFailed(
            f"webhook URL refused: {exc}",
            errors=[{"field": "url", "message": str(exc), "type": "url_policy"}],
        ) from None


def webhook_info(db: DbSession, client_id: str, *, reveal_secret: bool = False) -> WebhookInfo:
    client = db.get(ApiClient, client_id)
    if client is None:
        raise NotFound(f"client {client_id} not found")
    return WebhookInfo(client_id, client.webhook_url,
                       client.webhook_secret if reveal_secret else None)


def _start_cursor(db: DbSession, client_id: str) -> None:
    """A new listener gets events from now on, not the whole history."""
    latest = db.execute(select(func.max(Event.id))).scalar_one() or 0
    cursor = db.get(WebhookCursor, client_id)
    if cursor is None:
        db.add(WebhookCursor(client_id=client_id, last_event_pk=latest, updated_at=utcnow()))
    else:
        cursor.last_event_pk = latest
        cursor.updated_at = utcnow()


# ---- fan-out ---------------------------------------------------------------------------
def fan_out(runtime: Runtime, client: ApiClient, now: datetime) -> int:
    """Create delivery rows for the client's new events; returns how many."""
    with runtime.database.unit_of_work() as uow:
        db = uow.session
        cursor = db.get(WebhookCursor, client.client_id)
        if cursor is None:
            _start_cursor(db, client.client_id)
            uow.commit()
            return 0
        start = cursor.last_event_pk
        events = db.execute(
            select(Event.id, Event.session_id, Event.type, Event.occurred_at)
            .where(Event.id > start, scope_condition(client))
            .order_by(Event.id).limit(FAN_OUT_LIMIT)
        ).all()
        if not events:
            return 0
        known = set(db.execute(
            select(WebhookDelivery.event_pk).where(
                WebhookDelivery.client_id == client.client_id,
                WebhookDelivery.event_pk.in_([e.id for e in events]),
            )
        ).scalars())
        fresh = [e for e in events if e.id not in known]
        for e in fresh:
            db.add(WebhookDelivery(
                delivery_id=new_id("dlv"), client_id=client.client_id, event_pk=e.id,
                session_id=e.session_id, event_type=e.type, status=DeliveryStatus.PENDING,
                attempts=0, next_attempt_at=now, created_at=now,
            ))
        settled = start
        horizon = now - timedelta(seconds=SETTLE_SECONDS)
        for e in events:
            if e.occurred_at > horizon:
                break
            settled = e.id
        if len(events) == FAN_OUT_LIMIT and settled == start:
            settled = events[-1].id  # a full page of fresh events: never stall on it
        db.execute(
            update(WebhookCursor)
            .where(WebhookCursor.client_id == client.client_id,
                   WebhookCursor.last_event_pk == start)
            .values(last_event_pk=settled, updated_at=now)
        )
        try:
            uow.commit()
        except IntegrityError:
            return 0  # another fan-out inserted the same rows; theirs stand
        return len(fresh)


# ---- sending ---------------------------------------------------------------------------
def event_payload(event: Event) -> dict[str, Any]:
    """The event as the feed shows it."""
    return {
        "event_id": event.id,
        "type": event.type,
        "session_id": event.session_id,
        "account_id": event.account_id,
        "shop_id": event.shop_id,
        "audience": event.audience,
        "occurred_at": event.occurred_at.isoformat(),
        "data": event.data or {},
    }


def retry_delay(attempts: int, *, base: float, cap: float) -> float:
    """Seconds before attempt `attempts + 1`: base, 2·base, 4·base, … capped."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


@dataclass
class DeliveryReport:
    clients: int = 0
    fanned_out: int = 0
    delivered: int = 0
    failed_attempts: int = 0
    given_up: int = 0
    next_due_in: float | None = None  # seconds until the earliest pending retry
    busy_clients: list[str] = field(default_factory=list)


def _post(
    settings: Settings, client: ApiClient, delivery: WebhookDelivery, body: bytes
) -> tuple[int | None, str | None]:
    """One signed POST under the URL policy and one deadline (app.delivery.transport)."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        signing.DELIVERY_HEADER: delivery.delivery_id,
        signing.TIMESTAMP_HEADER: str(timestamp),
        signing.EVENT_HEADER: delivery.event_type,
        signing.ATTEMPT_HEADER: str(delivery.attempts + 1),
        signing.SIGNATURE_HEADER: signing.sign(client.webhook_secret or "", timestamp, body),
    }
    outcome = post_webhook(client.webhook_url or "", body=body, headers=headers,
                           timeout=settings.webhook_timeout,
                           allow_private=settings.webhook_allow_private)
    return outcome.status_code, outcome.error


def send_pending(
    runtime: Runtime, client: ApiClient, now: datetime, report: DeliveryReport,
    *, deadline: float,
) -> None:
    """POST the client's due deliveries in order, blocking a session behind its failure."""
    blocked: set[str] = set()
    with runtime.database.read() as db:
        queue = db.execute(
            select(WebhookDelivery.id, WebhookDelivery.session_id, WebhookDelivery.next_attempt_at)
            .where(WebhookDelivery.client_id == client.client_id,
                   WebhookDelivery.status == DeliveryStatus.PENDING)
            .order_by(WebhookDelivery.event_pk).limit(SEND_LIMIT)
        ).all()
    for item in queue:
        key = item.session_id or "-"
        if key in blocked:
            continue
        if item.next_attempt_at > now:
            blocked.add(key)
            _note_due(report, (item.next_attempt_at - now).total_seconds())
            continue
        if time.monotonic() > deadline:
            _note_due(report, 0.0)
            return
        if not _attempt(runtime, client, item.id, report):
            blocked.add(key)


def _note_due(report: DeliveryReport, seconds: float) -> None:
    seconds = max(0.0, seconds)
    if report.next_due_in is None or seconds < report.next_due_in:
        report.next_due_in = seconds


def _attempt(
    runtime: Runtime, client: ApiClient, delivery_pk: int, report: DeliveryReport,
) -> bool:
    """One POST of one delivery, recorded; True when it was delivered (or given up)."""
    settings = runtime.settings
    with runtime.database.unit_of_work() as uow:
        db = uow.session
        delivery = db.get(WebhookDelivery, delivery_pk)
        if delivery is None or delivery.status != DeliveryStatus.PENDING:
            return True
        event = db.get(Event, delivery.event_pk)
        body = json.dumps(
            {**event_payload(event), "delivery_id": delivery.delivery_id}  # type: ignore[arg-type]
            if event else {"delivery_id": delivery.delivery_id},
            ensure_ascii=False, separators=(",", ":"), default=str,
        ).encode()
        started = time.monotonic()
        status_code, error = _post(settings, client, delivery, body)
        now = utcnow()
        delivery.attempts += 1
        delivery.last_status_code = status_code
        db.add(WebhookAttempt(
            delivery_pk=delivery.id, attempt=delivery.attempts, url=client.webhook_url or "",
            attempted_at=now, status_code=status_code, error=error,
            duration_ms=int((time.monotonic() - started) * 1000),
        ))
        ok = error is None
        outcome = "delivered" if ok else (
            "given_up" if delivery.attempts >= settings.webhook_max_attempts else "retry")
        event_created_at = event.occurred_at if event is not None else None
        if ok:
            delivery.status = DeliveryStatus.DELIVERED
            delivery.delivered_at = now
            delivery.last_error = None
            report.delivered += 1
        else:
            delivery.last_error = error
            report.failed_attempts += 1
            if delivery.attempts >= settings.webhook_max_attempts:
                delivery.status = DeliveryStatus.FAILED
                report.given_up += 1
                log.warning("webhook %s to %s given up after %d attempts: %s",
                            delivery.delivery_id, client.client_id, delivery.attempts, error)
                ok = True  # no longer blocks the session's later events
            else:
                delay = retry_delay(delivery.attempts, base=settings.webhook_retry_base,
                                    cap=settings.webhook_retry_max)
                delivery.next_attempt_at = now + timedelta(seconds=delay)
                _note_due(report, delay)
        uow.commit()
    record_delivery(outcome, event_created_at)
    return ok


# ---- one run ---------------------------------------------------------------------------
def _rerun_key(runtime: Runtime, client_id: str) -> str:
    return f"{runtime.settings.redis_key_prefix}:delivery:rerun:{client_id}"


def _request_rerun(runtime: Runtime, client_id: str) -> None:
    runtime.markers.set(_rerun_key(runtime, client_id), ttl=600)


def _take_rerun(runtime: Runtime, client_id: str) -> bool:
    return runtime.markers.take(_rerun_key(runtime, client_id))


KICK_TTL = 30  # seconds a queued kick suppresses further ones (then the next one sends)


def _kick_key(runtime: Runtime) -> str:
    return f"{runtime.settings.redis_key_prefix}:delivery:kick-queued"


def claim_kick(runtime: Runtime) -> bool:
    """Should this commit start a delivery run? Only if none is queued and not yet
    started: a queued one reads the outbox when it starts, so it will see this commit's
    events too. Coalesces a burst of commits into one run instead of one per commit.
    The marker lives in Redis (in the process without it) and lapses after
    `KICK_TTL`, so a lost task costs at most that (the beat's safety-net run covers it
    anyway)."""
    try:
        return runtime.markers.claim(_kick_key(runtime), ttl=KICK_TTL)
    except RedisError:
        log.warning("delivery kick marker unavailable; starting the run anyway")
        return True


def kick_started(runtime: Runtime) -> None:
    """A delivery run starts: commits from now on need a run of their own (called
    before the run reads the outbox)."""
    try:
        runtime.markers.clear(_kick_key(runtime))
    except RedisError:
        log.warning("could not clear the delivery kick marker; it lapses by itself")


def deliver_webhooks(
    runtime: Runtime, *, client_id: str | None = None, time_budget: float = 60.0
) -> DeliveryReport:
    """Fan out and send for every listening client (or one). A client busy in another
    process is asked to run again when it finishes, so no new event waits for beat."""
    report = DeliveryReport()
    deadline = time.monotonic() + time_budget
    with runtime.database.read() as db:
        clients = [c for c in webhook_clients(db) if client_id in (None, c.client_id)]
    report.clients = len(clients)
    lock_ttl = time_budget + runtime.settings.webhook_timeout + 30
    for client in clients:
        name = f"{runtime.settings.redis_key_prefix}:delivery:client:{client.client_id}"
        while True:
            with run_lock(runtime.redis, name, ttl=lock_ttl) as mine:
                if not mine:
                    _request_rerun(runtime, client.client_id)
                    report.busy_clients.append(client.client_id)
                    break
                _take_rerun(runtime, client.client_id)
                now = utcnow()
                report.fanned_out += fan_out(runtime, client, now)
                send_pending(runtime, client, now, report, deadline=deadline)
            if not _take_rerun(runtime, client.client_id) or time.monotonic() > deadline:
                break
    return report


# ---- redelivery (SPEC §13) -------------------------------------------------------------
def redeliver(runtime: Runtime, delivery_id: str, *, actor: str,
              reason: str | None = None) -> dict[str, Any]:
    """Send a given-up delivery again: pending from now, with a fresh round of
    WEBHOOK_MAX_ATTEMPTS, the operator and time kept on it. For a session's event an
    audit row of that session (`redeliver`, the operator as actor) is written in the
    same transaction, a slot transaction like any other audit row (one chain writer at
    a time). Refused (409) unless the delivery is given up, its event still kept and
    its client still listening; then a delivery run is started."""
    with runtime.database.read() as db:
        found = db.execute(select(WebhookDelivery.session_id)
                           .where(WebhookDelivery.delivery_id == delivery_id)).one_or_none()
    if found is None:
        raise NotFound(f"delivery {delivery_id} not found")

    def reset(db: DbSession) -> WebhookDelivery:
        delivery = db.execute(select(WebhookDelivery)
                              .where(WebhookDelivery.delivery_id == delivery_id)
                              .with_for_update()).scalar_one()
        if delivery.status != DeliveryStatus.FAILED:
            raise Conflict(f"delivery {delivery_id} is {delivery.status}: only a given-up "
                           "(failed) delivery is sent again", delivery_status=delivery.status)
        if db.get(Event, delivery.event_pk) is None:
            raise Conflict(f"the event of delivery {delivery_id} is no longer kept "
                           "(EVENTS_RETENTION)", event_id=delivery.event_pk)
        client = db.get(ApiClient, delivery.client_id)
        if client is None or client.revoked_at is not None or not client.webhook_url:
            raise Conflict(f"client {delivery.client_id} has no webhook URL any more")
        now = utcnow()
        delivery.status, delivery.attempts = DeliveryStatus.PENDING, 0
        delivery.next_attempt_at = delivery.redelivered_at = now
        delivery.redelivered_by = actor
        return delivery

    details = {"delivery_id": delivery_id}
    session_id = found.session_id
    if session_id is not None:
        def work(tx: Any, session: Any) -> WebhookDelivery:
            delivery = reset(tx.db)
            tx.audit(session, AuditOperation.REDELIVER, from_status=session.status, actor=actor,
                     reason=reason, details={**details, "event_id": delivery.event_pk,
                                             "event_type": delivery.event_type})
            tx.uow.after_commit(runtime.hooks.events_written)  # start a delivery run
            return delivery

        try:
            runtime.sessions.run_on_session(session_id, actor, work)
        except NotFound:
            session_id = None  # an event of no session we keep: the delivery row records it
    if session_id is None:
        with runtime.database.unit_of_work() as uow:
            reset(uow.session)
            # start a delivery run (as a new event would); if that fails, the delivery is
            # pending: the beat's safety-net run sends it
            uow.after_commit(runtime.hooks.events_written)
            uow.commit()
    log.info("webhook delivery %s redelivered by %s", delivery_id, actor)
    with runtime.database.read() as db:
        return delivery_log(db, delivery_id=delivery_id, limit=1)[0]


# ---- the admin view --------------------------------------------------------------------
def delivery_log(
    db: DbSession,
    *,
    client_id: str | None = None,
    status: str | None = None,
    session_id: str | None = None,
    limit: int = 50,
    before_id: int | None = None,
    with_attempts: bool = True,
    delivery_id: str | None = None,
) -> list[dict[str, Any]]:
    """Deliveries newest first, with their attempts and last error (for the admin API)."""
    stmt = select(WebhookDelivery).order_by(WebhookDelivery.id.desc()).limit(limit)
    if delivery_id:
        stmt = stmt.where(WebhookDelivery.delivery_id == delivery_id)
    if client_id:
        stmt = stmt.where(WebhookDelivery.client_id == client_id)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status.lower())
    if session_id:
        stmt = stmt.where(WebhookDelivery.session_id == session_id)
    if before_id:
        stmt = stmt.where(WebhookDelivery.id < before_id)
    rows = db.execute(stmt).scalars().all()
    attempts: dict[int, list[dict[str, Any]]] = {}
    if with_attempts and rows:
        for a in db.execute(
            select(WebhookAttempt).where(WebhookAttempt.delivery_pk.in_([r.id for r in rows]))
            .order_by(WebhookAttempt.id)
        ).scalars():
            attempts.setdefault(a.delivery_pk, []).append({
                "attempt": a.attempt, "attempted_at": a.attempted_at.isoformat(),
                "status_code": a.status_code, "error": a.error, "duration_ms": a.duration_ms,
            })
    return [{
        "id": r.id, "delivery_id": r.delivery_id, "client_id": r.client_id,
        "event_id": r.event_pk, "event_type": r.event_type, "session_id": r.session_id,
        "status": r.status, "attempts": r.attempts, "last_error": r.last_error,
        "last_status_code": r.last_status_code,
        "next_attempt_at": r.next_attempt_at.isoformat() if r.status == "pending" else None,
        "created_at": r.created_at.isoformat(),
        "delivered_at": r.delivered_at.isoformat() if r.delivered_at else None,
        "redelivered_at": r.redelivered_at.isoformat() if r.redelivered_at else None,
        "redelivered_by": r.redelivered_by,
        **({"attempt_log": attempts.get(r.id, [])} if with_attempts else {}),
    } for r in rows]


def delivery_summary(db: DbSession) -> list[dict[str, Any]]:
    """Per client: deliveries by status and the oldest pending one (admin statistics)."""
    rows = db.execute(
        select(WebhookDelivery.client_id, WebhookDelivery.status, func.count(),
               func.min(WebhookDelivery.created_at))
        .group_by(WebhookDelivery.client_id, WebhookDelivery.status)
    ).all()
    summary: dict[str, dict[str, Any]] = {}
    for client_id, status, count, oldest in rows:
        entry = summary.setdefault(client_id, {"client_id": client_id, "pending": 0,
                                               "delivered": 0, "failed": 0,
                                               "oldest_pending_at": None})
        entry[status] = count
        if status == DeliveryStatus.PENDING and oldest is not None:
            entry["oldest_pending_at"] = oldest.isoformat()
    return list(summary.values())
