"""Every request's trace id and metrics (SPEC §13).

At the start of a request (the app's first `before_request`): a new `trace_id`, bound
with the session or import job the URL names for the request's log lines (the client
is bound once authenticated, `app.api.auth`). At its end: the `X-Trace-Id` header (every
problem document carries the same id, `app.api.problems`), one count and one duration
sample labelled with the URL rule. The trace id is generated, never taken from the
request: SPEC §13 does not ask for an incoming one, and a client-chosen id could forge
or collide with another request's lines.

Cost: a few microseconds a request (no database or Redis round trip); the metric
children of each (method, rule, status) are looked up once and kept.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, g, request

from app.observability import context
from app.observability.metrics import HTTP_DURATION, HTTP_REQUESTS

TRACE_HEADER = "X-Trace-Id"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a URL no rule matched (404, bounded)

_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _start() -> None:
    fields: dict[str, Any] = {"trace_id": context.new_trace_id()}
    view_args = request.view_args
    if view_args:
        fields["session_id"] = view_args.get("session_id")
        fields["job_id"] = view_args.get("job_id")
    g.observed = (time.perf_counter(), context.start(**fields))


def _finish(response: Response) -> Response:
    observed = g.get("observed")
    if observed is None:  # pragma: no cover - the first before_request always ran
        return response
    trace_id = context.trace_id()
    if trace_id:
        response.headers[TRACE_HEADER] = trace_id
    rule = request.url_rule
    method = request.method if request.method in METHODS else "OTHER"
    key = (method, rule.rule if rule is not None else UNMATCHED, response.status_code)
    children = _children.get(key)
    if children is None:
        children = (HTTP_REQUESTS.labels(key[0], key[1], str(key[2])),
                    HTTP_DURATION.labels(key[0], key[1]))
        _children[key] = children
    children[0].inc()
    children[1].observe(time.perf_counter() - observed[0])
    return response


def _end(_exc: BaseException | None) -> None:
    observed = g.pop("observed", None)
    if observed is not None:
        context.end(observed[1])


def init_app(app: Flask) -> None:
    """Install the hooks: the start runs before every other `before_request`."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
    app.teardown_request(_end)
