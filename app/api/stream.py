"""Serving the live event stream over HTTP (SPEC §12): one adapter for both doors.

`GET /api/v1/events/stream` (bearer token, `app.api.events`) and
`GET /admin/api/events/stream` (the console's cookie, `admin.live`) both end here:
parse the cursor, count the stream in, read the first page through the feed before
answering (so a bad or expired cursor, or a database that is down, is the status of
the answer — 422, 410, 503 — not a broken stream), then answer `text/event-stream`.

Who serves streams: the Procfile's `stream` process (`app.stream_wsgi`, gevent: a
stream is a greenlet, not a thread) and, on the embedded default, `make run`'s one
process (at most EMBEDDED_STREAMS, each holding one of its threads). The `web`
processes of the Procfile layout answer 404 naming the stream port, so a thousand
streams never sit on the API's request threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.api.http import runtime
from app.api.problems import validation_problem
from app.clients.service import ClientIdentity
from app.errors import NotFound, ValidationFailed
from app.events.feed import SETTLE_SECONDS
from app.events.stream import EventHub, EventSubscription, Viewer
from app.runtime import Runtime
from app.validation import field_errors

log = logging.getLogger(__name__)

HUB_KEY = "auto_session.event_hub"
SERVES_STREAMS = "STREAM_SERVER"  # app.config flag: set by app.stream_wsgi
EMBEDDED_STREAMS = 4  # the embedded server's 8 threads: half may hold a stream
MAX_CURSOR = 2**63 - 1
_hub_lock = threading.Lock()


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: int | None = Field(default=None, ge=0, le=MAX_CURSOR,
                              description="resume after this event id (a `Last-Event-ID` "
                              "header wins); none: start at the newest event")


def serves_streams(app: Flask) -> bool:
    """This process serves streams: the `stream` process, or the embedded default's one."""
    return bool(app.config.get(SERVES_STREAMS)) or runtime().settings.embedded


def event_hub() -> EventHub:
    """The hub of this app and runtime, started on first use (its poller is one thread
    or greenlet)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    rt = runtime()
    hubs: dict[int, tuple[Runtime, EventHub]] = app.extensions.setdefault(HUB_KEY, {})
    found = hubs.get(id(rt))
    if found is not None and found[0] is rt:
        return found[1]
    with _hub_lock:
        found = hubs.get(id(rt))
        if found is not None and found[0] is rt:
            return found[1]
        for _, old in hubs.values():  # a test's app given another runtime
            old.stop()
        hubs.clear()
        settings = rt.settings
        hub = EventHub(
            rt.database, poll_interval=settings.stream_poll_interval,
            max_streams=(settings.stream_max_connections if app.config.get(SERVES_STREAMS)
                         else min(EMBEDDED_STREAMS, settings.stream_max_connections)),
            settle_seconds=app.config.get("EVENTS_SETTLE_SECONDS", SETTLE_SECONDS),
        )
        hub.start()
        _wake_on_commit(rt, hub)
        hubs[id(rt)] = (rt, hub)
        return hub


def _wake_on_commit(rt: Runtime, hub: EventHub) -> None:
    """Commits in this process (the embedded default's web requests, sweeps) wake the hub
    at once; other processes' commits are seen at the next poll."""
    hooks = rt.hooks
    previous = hooks.events_written

    def events_written() -> None:
        hub.wake()
        previous()

    hooks.events_written = events_written


def stream_cursor() -> int | None:
    """`Last-Event-ID` (an EventSource reconnecting), else `after`, else None."""
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip():
        try:
            return StreamQuery.model_validate({"after": header.strip()}).after
        except ValidationError as exc:
            errors = [{**e, "field": "Last-Event-ID"} for e in field_errors(exc)]
            raise ValidationFailed("invalid Last-Event-ID header: not an event id",
                                   errors=errors) from None
    data = {key: request.args.getlist(key)[-1] for key in request.args}
    try:
        return StreamQuery.model_validate(data).after
    except ValidationError as exc:
        raise validation_problem(exc, where="query") from None


def open_stream(client: ClientIdentity) -> Response:
    """The SSE answer for `client`, or the problem that stops it before it starts."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    settings = runtime().settings
    if not serves_streams(app):
        raise NotFound(f"the event stream is served by the stream process on port "
                       f"{settings.stream_port} (the Procfile's `stream`), not by the API's")
    after = stream_cursor()
    hub = event_hub()
    hub.open()  # StreamsFull (a 503) past STREAM_MAX_CONNECTIONS
    try:
        subscription = EventSubscription(
            hub, Viewer(client.client_id, str(client.role)), after=after,
            keepalive=settings.stream_keepalive_interval)
        if after is not None:
            subscription.catch_up()  # 410 / 503 here, before any byte of the stream
    except BaseException:
        hub.close()
        raise
    response = Response(_StreamBody(hub, subscription), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass frames on unbuffered
    allow_cross_origin(response)
    return response


class _StreamBody:
    """The stream's body. The stream is counted out however it ends: the client went
    away (the server closes the body — WSGI calls `close()` even on a body it never
    iterated, a HEAD), or the database failed mid-stream (the client reconnects with its
    Last-Event-ID)."""

    def __init__(self, hub: EventHub, subscription: EventSubscription) -> None:
        self.hub = hub
        self.subscription = subscription
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield b"retry: 2000\n"
            yield from self.subscription.frames()
        except GeneratorExit:
            raise
        except Exception:
            log.warning("event stream ended by an error; the client resumes from its cursor",
                        exc_info=True)
        finally:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.hub.close()


def allowed_origins() -> set[str]:
    settings = runtime().settings
    listed = {o.strip().rstrip("/") for o in (settings.stream_cors_origins or "").split(",")}
    return {o for o in listed if o}


def allow_cross_origin(response: Response) -> None:
    """Let the console's page open the stream with its cookie (EventSource
    `withCredentials` needs the exact origin): the web process of this host (`PORT`), or
    a listed origin — not any other port of the host, whose pages would get the cookie
    (cookies are per host, not per port)."""
    origin = request.headers.get("Origin")
    if not origin:
        return
    parsed = urlsplit(origin)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return
    web = parsed.hostname is not None and parsed.hostname == urlsplit(
        f"//{request.host}").hostname and port == runtime().settings.port
    if web or origin.rstrip("/") in allowed_origins():
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Last-Event-ID"
        response.headers["Access-Control-Allow-Methods"] = "GET"
        response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Vary"] = "Origin"


def preflight() -> Response:
    """The answer to a CORS preflight (a reconnect's Last-Event-ID header may need one)."""
    response = Response(status=204)
    allow_cross_origin(response)
    return response


def stream_url_for_console(path: str) -> str:
    """Where the console's pages open the admin stream: this origin on the embedded
    default, else STREAM_PUBLIC_URL, else this host at STREAM_PORT."""
    settings = runtime().settings
    if settings.embedded:
        return path
    if settings.stream_public_url:
        return settings.stream_public_url.rstrip("/") + path
    host = urlsplit(f"//{request.host}").hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{request.scheme}://{host}:{settings.stream_port}{path}"


def stream_origin_for_console() -> str | None:
    """The stream's origin when it is not this one (for the console's connect-src)."""
    url = stream_url_for_console("/")
    if url.startswith("/"):
        return None
    parsed = urlsplit(url)
    return f"{parsed.scheme}://{parsed.netloc}"
