"""The one place that turns exceptions into RFC 9457 `application/problem+json` answers.

Every exception family has one mapping here (STYLE lesson 6):

- `AutoSessionError` (the domain tree in `app.errors`): its own status, type, title,
  detail and extension members (e.g. `occupant`, `allowed`, `errors`).
- `pydantic.ValidationError` raised while parsing a request: 422 with `errors`, one
  `{"field": "a.b", "message": "…", "type": "…"}` per bad field.
- werkzeug `HTTPException` (404 for an unknown URL, 405, 413, …): its status and text.
- a lost database or Redis connection (the server went away, a connection in the pool
  was dropped, Redis is unreachable): 503 `/problems/unavailable` with `Retry-After`;
  the pool has been reset, so the client's retry gets a fresh connection.
- anything else: 500 with a generic detail; the exception is logged server-side with
  the request's trace id. No stack trace, SQL or secret ever reaches a client.

Every problem document carries the request's `trace_id` (`app.api.observe`; the same
id is in the `X-Trace-Id` header and in the request's log lines).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import ValidationError
from redis.exceptions import BusyLoadingError as RedisBusyLoading
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnly
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from app.db import is_unavailable_db_error
from app.errors import AutoSessionError, ServiceUnavailable, ValidationFailed
from app.observability import context
from app.validation import field_errors

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    type: str = "about:blank",
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Response:
    """A problem document; extension members go in `extra`."""
    body: dict[str, Any] = {"type": type, "title": title, "status": status, "detail": detail}
    body.update(extra)
    body.setdefault("trace_id", context.trace_id() or context.new_trace_id())
    response = Response(
        json.dumps(body, ensure_ascii=False, default=str), status=status, mimetype=PROBLEM_JSON
    )
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def validation_problem(exc: ValidationError, *, where: str = "body") -> ValidationFailed:
    """A pydantic failure as the domain's 422, naming every bad field."""
    errors = field_errors(exc)
    names = ", ".join(sorted({e["field"] for e in errors})) or where
    return ValidationFailed(f"invalid {where}: {names}", errors=errors)


def render_domain_error(exc: AutoSessionError) -> Response:
    body = exc.problem()
    headers: dict[str, str] = {}
    if exc.retryable:
        headers["Retry-After"] = "1"
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    status = body.pop("status")
    return problem_response(
        status,
        body.pop("title"),
        body.pop("detail"),
        type=body.pop("type"),
        headers=headers,
        **body,
    )


def render_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    headers: dict[str, str] = {}
    valid_methods = getattr(exc, "valid_methods", None)
    if status == 405 and valid_methods:
        headers["Allow"] = ", ".join(valid_methods)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return problem_response(
        status,
        exc.name,
        exc.description or exc.name,
        type=f"/problems/http-{status}",
        headers=headers,
    )


def is_connection_loss(exc: BaseException) -> bool:
    """A backing service that cannot be reached: the database (a refused new connection,
    a dropped one, an exhausted pool, a server going away), Redis (refused, timed out,
    loading, read-only after a failover) or the Celery broker."""
    if is_unavailable_db_error(exc):
        return True
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | RedisBusyLoading
                  | RedisReadOnly | KombuOperationalError):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and isinstance(
        cause, RedisConnectionError | RedisTimeoutError | KombuOperationalError)


def render_connection_loss(exc: Exception) -> Response:
    trace_id = context.trace_id() or context.new_trace_id()
    log.warning("lost a connection to a backing service (trace_id=%s): %s", trace_id,
                exc.__class__.__name__, exc_info=exc)
    unavailable = ServiceUnavailable(
        "a backing service (database or Redis) is unreachable or dropped the connection; "
        "retry the request", trace_id=trace_id)
    return render_domain_error(unavailable)


def render_unexpected(exc: Exception) -> Response:
    trace_id = context.trace_id() or context.new_trace_id()
    log.error("unhandled error (trace_id=%s)", trace_id, exc_info=exc)
    return problem_response(
        500,
        "Internal server error",
        "the server could not complete the request; it was logged with this trace_id",
        type="/problems/internal",
        trace_id=trace_id,
    )


def register_error_handlers(app: Flask) -> None:
    """Install the mappings above on `app` (the factory calls this once)."""

    @app.errorhandler(AutoSessionError)
    def _domain(exc: AutoSessionError) -> Response:
        return render_domain_error(exc)

    @app.errorhandler(ValidationError)
    def _pydantic(exc: ValidationError) -> Response:
        return render_domain_error(validation_problem(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        return render_http_error(exc)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):  # pragma: no cover - routed above
            return render_http_error(exc)
        if is_connection_loss(exc):
            return render_connection_loss(exc)
        return render_unexpected(exc)
