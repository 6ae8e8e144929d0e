"""Every request's trace id and metrics (SPEC §13).

At the start of a request (the app's first `before_request`): a new `trace_id`, bound
with the session or import job the URL names for the request's log lines (the client
is bound once authenticated, `app.api.auth`). At its end: the `X-Trace-Id` header (every
problem document carries the same id, `app.api.problems`), one count and one duration
sample labelled with the URL rule. The trace id is generated, never taken from the
request: SPEC §13 does not ask for an incoming one, and a client-chosen id could forge
or collide with another request's lines.

Cost: a few microseconds a request, no database or Redis round trip: the count and the
duration go to this process's `REQUEST_TALLY`, written to the shared metrics once a
second (`tests/benchmarks/bench_observability.py`).
"""

from __future__ import annotations

import time

from flask import Flask, Response, request

from app.observability import context
from app.observability.metrics import REQUEST_TALLY

TRACE_HEADER = "X-Trace-Id"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a URL no rule matched (404, bounded)
BOUND_ARGS = ("session_id", "job_id")  # URL parameters that go into the log lines
STARTED_KEY = "auto_session.started"


def _start() -> None:
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy look-up
    fields = {"trace_id": context.new_trace_id()}
    view_args = req.view_args
    if view_args:
        for name in BOUND_ARGS:
            if name in view_args:
                fields[name] = str(view_args[name])
    # A request replaces whatever an earlier request of this thread bound: nothing to undo
    # at its end (gunicorn's access line, written after the answer, still sees it).
    context.begin(fields)
    req.environ[STARTED_KEY] = time.perf_counter()


def _finish(response: Response) -> Response:
    req = request._get_current_object()  # type: ignore[attr-defined]
    started = req.environ.get(STARTED_KEY)
    if started is None:  # pragma: no cover - the first before_request always ran
        return response
    trace_id = context.trace_id()
    if trace_id:
        response.headers.add(TRACE_HEADER, trace_id)
    rule = req.url_rule
    method = req.method
    REQUEST_TALLY.add(method if method in METHODS else "OTHER",
                      rule.rule if rule is not None else UNMATCHED, response.status_code,
                      time.perf_counter() - started)
    return response


def init_app(app: Flask) -> None:
    """Install the hooks: the start runs before every other `before_request`."""
    app.before_request_funcs.setdefault(None, []).insert(0, _start)
    app.after_request_funcs.setdefault(None, []).insert(0, _finish)
