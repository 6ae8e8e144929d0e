"""Small HTTP helpers every blueprint uses: parse bodies and queries into pydantic
models, render models as JSON, reach the runtime.

Usage in a view::

    from app.api.http import parse_body, parse_query, respond, runtime

    @bp.post("/things")
    @require_roles("admin")
    def create_thing() -> Response:
        request_model = parse_body(ThingRequest)        # 422 problem naming bad fields
        view = thing_service(runtime()).create(request_model)
        return respond(view, status=201)                # application/json from the model

`parse_body` accepts a JSON object body (an empty body counts as `{}`); invalid
JSON or a model validation failure raises `ValidationFailed` (422, with `errors`:
`[{"field", "message", "type"}]`), rendered by `app.api.problems`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, request
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError

from app.api.problems import validation_problem
from app.errors import ValidationFailed
from app.runtime import Runtime, get_runtime
from app.validation import MAX_JSON_DEPTH

RUNTIME_KEY = "auto_session.runtime"
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def runtime() -> Runtime:
    """The runtime of the current app (the one given to `create_app`, else the process's)."""
    rt: Runtime | None = current_app.extensions.get(RUNTIME_KEY)
    if rt is None:
        rt = get_runtime()
        current_app.extensions[RUNTIME_KEY] = rt
    return rt


def limit_request_bodies(app: Flask) -> None:
    """Every request body is bounded by MAX_REQUEST_BYTES (413 past it); the upload views
    raise their own bound to MAX_UPLOAD_BYTES before they read the body."""

    @app.before_request
    def _bound_body() -> None:
        request.max_content_length = runtime().settings.max_request_bytes


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# One decoder for every request (`json.loads` with hooks builds a decoder and its scanner
# on each call: half its cost for a one-message body); decoding keeps no state.
_STRICT = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no NaN/Infinity, no number that overflows a float, and a nesting
    depth the parser can handle (a 100,000-deep body is refused, not a RecursionError).
    Raises ValueError naming the problem. Bytes are decoded as `json.loads` decodes them
    (UTF-8, -16 or -32, detected); a text starting with a byte-order mark is refused."""
    try:
        if isinstance(raw, str):
            if raw.startswith("\ufeff"):
                raise ValueError("unexpected UTF-8 byte-order mark")
        else:
            raw = raw.decode(json.detect_encoding(raw), "surrogatepass")
        return _STRICT.decode(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def request_json() -> Any:
    """The request body as JSON (`{}` when empty); 422 if it is not JSON."""
    raw = request.get_data(cache=True)
    if not raw or not raw.strip():
        return {}
    try:
        return parse_json(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed(
            "request body is not valid JSON",
            errors=[{"field": "body", "message": f"not valid JSON: {exc}", "type": "json_invalid"}],
        ) from None


def parse_body[M: BaseModel](model: type[M], *, context: Mapping[str, Any] | None = None) -> M:
    """The JSON body validated as `model` (422 problem with field errors otherwise)."""
    data = request_json()
    try:
        return model.model_validate(data, context=dict(context or {}))
    except ValidationError as exc:
        raise validation_problem(exc, where="body") from None


def parse_query[M: BaseModel](model: type[M]) -> M:
    """The query string validated as `model`; repeated parameters keep the last value."""
    data = {key: request.args.getlist(key)[-1] for key in request.args}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(exc, where="query") from None


@functools.cache
def _adapter(kind: type) -> TypeAdapter[Any]:
    """One serializer per body type (building a TypeAdapter costs more than using it)."""
    return TypeAdapter(kind)


def respond(
    body: BaseModel | list[Any] | dict[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """`body` rendered as application/json (pydantic models through their serializer)."""
    try:
        if isinstance(body, BaseModel):
            text = body.model_dump_json()
        else:
            text = _adapter(type(body)).dump_json(body).decode()
    except PydanticSerializationError:
        # A value stored before validation refused it (a lone surrogate from an older
        # release) must not make every later read fail: answer it with U+FFFD instead.
        plain = body.model_dump(mode="python") if isinstance(body, BaseModel) else body
        text = LONE_SURROGATE.sub("\ufffd", json.dumps(plain, ensure_ascii=False, default=str))
    response = Response(text, status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
