"""`GET /api/v1/events`: the cursor feed, scoped to the calling client."""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from app.api.auth import current_client, require_roles
from app.api.http import parse_query, respond, runtime
from app.api.openapi import documented
from app.api.stream import StreamQuery, open_stream, preflight
from app.db import utcnow
from app.events.feed import SETTLE_SECONDS, EventPage, EventQuery, read_feed

bp = Blueprint("events", __name__, url_prefix="/api/v1/events")


@bp.get("")
@documented(
    summary="Events after a cursor (resumable: nothing missed, nothing repeated)",
    description="A bot sees its own sessions' events, the desk what is addressed to it, "
    "admins everything. Pass the answer's `next` as `after` to continue. Events are kept "
    "EVENTS_RETENTION (7 days): a cursor before the oldest kept event answers 410 "
    "`/problems/cursor-expired` with `oldest_cursor`, the `after` to resume from.",
    tags=("events",), query=EventQuery, responses={200: EventPage}, errors=(410,),
)
@require_roles("bot", "desk", "admin")
def feed() -> Response:
    query = parse_query(EventQuery)
    client = current_client()
    with runtime().database.read() as db:
        page = read_feed(
            db, client_id=client.client_id, role=str(client.role), after=query.after,
            limit=query.limit, now=utcnow(),
            settle_seconds=current_app.config.get("EVENTS_SETTLE_SECONDS", SETTLE_SECONDS),
        )
    return respond(page)


@bp.get("/stream", provide_automatic_options=False)
@documented(
    summary="The events as a live stream (Server-Sent Events)",
    description="`text/event-stream`: each event as `id: <event_id>`, `event: <type>`, "
    "`data: <the event as in the feed>`; the feed's scoping. Resumes after the "
    "`Last-Event-ID` header or `after` with nothing missed or repeated; without either "
    "it starts at the newest event. A comment line every STREAM_KEEPALIVE_INTERVAL "
    "seconds (15) keeps an idle stream open. Served by the Procfile's `stream` process "
    "on STREAM_PORT (the embedded default: on the web port). 410 when the cursor is "
    "older than the oldest kept event.",
    tags=("events",), query=StreamQuery, errors=(404, 410, 422, 503),
    headers=(("Last-Event-ID", "resume after this event id (wins over `after`)", False),),
)
@require_roles("bot", "desk", "admin")
def stream() -> Response:
    return open_stream(current_client())


@bp.route("/stream", methods=["OPTIONS"], provide_automatic_options=False)
def stream_preflight() -> Response:
    return preflight()
