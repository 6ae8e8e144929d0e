"""`/admin/api/...`: the admin API (SPEC §7, §8), admin clients only.

Views translate HTTP into one call of the admin modules (`admin.sessions`, `admin.audit`,
`admin.transfers`, `admin.stats`) or of the feature services they reuse (clients, agents,
imports, deliveries) and render JSON; errors are the same RFC 9457 problems as the rest
of the API. Every route admits a bearer admin token or the console's cookie (+ CSRF
header on writes), see `admin.auth`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from admin import audit as admin_audit
from admin import sessions as admin_sessions
from admin import stats as admin_stats
from admin import transfers as admin_transfers
from admin.auth import admin_client, admin_only
from admin.queries import (
    AuditSearch,
    ClientCreate,
    DeliveryQuery,
    ImportListQuery,
    OffsetQuery,
    OperatorAction,
    Redelivery,
    SessionSearch,
    SlotQuery,
    SlotRelease,
    VerifyRange,
)
from admin.serializers import client_json
from app.agents.service import AgentFilters, AgentService
from app.api.auth import client_service
from app.api.http import parse_body, parse_query, respond, runtime
from app.api.uploads import receive_upload
from app.delivery.service import delivery_log, delivery_summary, redeliver
from app.errors import NotFound, ValidationFailed
from app.imports import jobs as import_jobs
from app.imports.service import ImportService
from app.transfers.enums import TransferStatus

bp = Blueprint("api", __name__, url_prefix="/api")


def _page(items: list[Any], following: Any) -> Response:
    return respond({"items": items, "next": None if following is None else str(following)})


# ---- sessions ----------------------------------------------------------------------------
@bp.get("/sessions")
@admin_only
def search_sessions() -> Response:
    search = parse_query(SessionSearch)
    with runtime().database.read() as db:
        items, following = admin_sessions.search_sessions(db, search)
    return _page(items, following)


@bp.get("/sessions/<session_id>")
@admin_only
def session_detail(session_id: str) -> Response:
    with runtime().database.read() as db:
        return respond(admin_sessions.session_detail(db, session_id))


@bp.post("/sessions/<session_id>/force-close")
@admin_only
def force_close(session_id: str) -> Response:
    action = parse_body(OperatorAction)
    operator = admin_client()
    outcome = admin_sessions.force_close(
        runtime().sessions, session_id, actor=operator.actor, reason=action.reason,
        operator=operator.name,
    )
    return respond(outcome)


@bp.get("/sessions/<session_id>/audit/verify")
@admin_only
def verify_session_chain(session_id: str) -> Response:
    with runtime().database.read() as db:
        return respond(admin_audit.verify_session_chain(db, session_id))


# ---- audit -------------------------------------------------------------------------------
@bp.get("/audit")
@admin_only
def search_audit() -> Response:
    search = parse_query(AuditSearch)
    with runtime().database.read() as db:
        items, following = admin_audit.search_audit(db, search)
    return _page(items, following)


@bp.get("/audit/verify")
@admin_only
def verify_chains() -> Response:
    request_range = parse_query(VerifyRange)
    with runtime().database.read() as db:
        return respond(admin_audit.verify_chains(db, request_range))


# ---- slots -------------------------------------------------------------------------------
@bp.get("/slots")
@admin_only
def slot_view() -> Response:
    query = parse_query(SlotQuery)
    with runtime().database.read() as db:
        return respond(admin_sessions.slot_view(db, query.account_id, query.shop_id))


@bp.post("/slots/release")
@admin_only
def release_slot() -> Response:
    body = parse_body(SlotRelease)
    operator = admin_client()
    outcome = admin_sessions.release_slot(
        runtime().sessions, body.account_id, body.shop_id, actor=operator.actor,
        reason=body.reason, operator=operator.name,
    )
    return respond(outcome)


# ---- transfers and agents ------------------------------------------------------------------
@bp.get("/transfers")
@admin_only
def transfer_queue() -> Response:
    with runtime().database.read() as db:
        return respond({
            "items": admin_transfers.transfer_queue(db), "next": None,
            # being handled: each with its first-response flag and wait (SPEC §12)
            "accepted": admin_transfers.transfer_queue(db, status=TransferStatus.ACCEPTED),
        })


@bp.get("/agents")
@admin_only
def list_agents() -> Response:
    filters = parse_query(AgentFilters)
    items, following = AgentService(runtime().database).list(filters)
    return _page([a.model_dump(mode="json") for a in items], following)


# ---- import jobs ----------------------------------------------------------------------------
@bp.get("/imports")
@admin_only
def list_imports() -> Response:
    query = parse_query(ImportListQuery)
    try:
        items = ImportService(runtime()).list(limit=query.limit + 1, before=query.after,
                                              status=query.status)
    except NotFound:  # the cursor is a job id; no such job means it is not from `next`
        raise ValidationFailed("invalid query: after", [
            {"field": "after", "message": "not a cursor from `next`"}]) from None
    more = len(items) > query.limit
    items = items[: query.limit]
    return _page([import_jobs.import_progress(j) for j in items],
                 items[-1].job_id if more else None)


@bp.post("/imports")
@admin_only
def upload_import() -> Response:
    """The console's upload (also usable with a bearer token): the same upload as
    `POST /api/v1/imports` (`app.api.uploads`), answered with the console's progress."""
    job = receive_upload(actor=admin_client().actor)
    return respond(import_jobs.import_progress(job), status=202)


@bp.get("/imports/<job_id>")
@admin_only
def import_job(job_id: str) -> Response:
    return respond(import_jobs.import_progress(ImportService(runtime()).get(job_id)))


@bp.get("/imports/<job_id>/errors")
@admin_only
def import_job_errors(job_id: str) -> Response:
    query = parse_query(OffsetQuery)
    with runtime().database.read() as db:
        return respond(import_jobs.import_job_errors(db, job_id, offset=query.offset,
                                                     limit=query.limit))


@bp.post("/imports/<job_id>/retry")
@admin_only
def retry_import(job_id: str) -> Response:
    retry = parse_body(import_jobs.ImportRetry)
    import_jobs.retry_import_job(runtime().database, job_id, retry)
    runtime().dispatcher.start_import(job_id)
    return respond(import_jobs.import_progress(ImportService(runtime()).get(job_id)),
                   status=202)


# ---- API clients ------------------------------------------------------------------------------
@bp.get("/clients")
@admin_only
def list_clients() -> Response:
    rows = client_service().list()
    return respond({"items": [client_json(r) for r in rows], "next": None})


@bp.post("/clients")
@admin_only
def create_client() -> Response:
    body = parse_body(ClientCreate)
    settings = runtime().settings
    issued = client_service().create(name=body.name, role=body.role,
                                     webhook_url=body.webhook_url,
                                     allow_private_webhook=settings.webhook_allow_private,
                                     resolve_timeout=settings.webhook_timeout)
    return respond(_issued(issued.client_id, issued.token), status=201)


@bp.post("/clients/<client_id>/revoke")
@admin_only
def revoke_client(client_id: str) -> Response:
    client_service().revoke(client_id)
    return respond(_client(client_id))


@bp.post("/clients/<client_id>/rotate")
@admin_only
def rotate_client(client_id: str) -> Response:
    issued = client_service().rotate(client_id)
    return respond(_issued(issued.client_id, issued.token))


def _client(client_id: str) -> dict[str, Any]:
    from app.clients.models import ApiClient

    with runtime().database.read() as db:
        row = db.get(ApiClient, client_id)
        assert row is not None
        return client_json(row)


def _issued(client_id: str, token: str) -> dict[str, Any]:
    """The client and its new token: the only answer that ever shows the token."""
    return {**_client(client_id), "token": token}


# ---- webhook deliveries --------------------------------------------------------------------------
@bp.get("/deliveries")
@admin_only
def list_deliveries() -> Response:
    query = parse_query(DeliveryQuery)
    with runtime().database.read() as db:
        rows = delivery_log(db, client_id=query.client_id, status=query.status,
                            session_id=query.session_id, limit=query.limit + 1,
                            before_id=query.after)
        summary = delivery_summary(db)
    page = rows[: query.limit]
    following = page[-1]["id"] if len(rows) > query.limit else None
    return respond({"items": page, "next": None if following is None else str(following),
                    "summary": summary})


@bp.post("/deliveries/<delivery_id>/redeliver")
@admin_only
def redeliver_delivery(delivery_id: str) -> Response:
    """Send a given-up delivery again (SPEC §13), audited with the operator as actor."""
    body = parse_body(Redelivery)
    operator = admin_client()
    return respond(redeliver(runtime(), delivery_id, actor=operator.actor,
                             reason=body.reason))


# ---- statistics ---------------------------------------------------------------------------------
@bp.get("/stats")
@admin_only
def stats() -> Response:
    with runtime().database.read() as db:
        return respond(admin_stats.statistics(db))
