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
from collections.abc import Mapping
from typing import Any

from flask import Response, current_app, request
from pydantic import BaseModel, TypeAdapter, ValidationError

from app.api.problems import validation_problem
from app.errors import ValidationFailed
from app.runtime import Runtime, get_runtime

RUNTIME_KEY = "auto_session.runtime"


def runtime() -> Runtime:
    """The runtime of the current app (the one given to `create_app`, else the process's)."""
    rt: Runtime | None = current_app.extensions.get(RUNTIME_KEY)
    if rt is None:
        rt = get_runtime()
        current_app.extensions[RUNTIME_KEY] = rt
    return rt


def request_json() -> Any:
    """The request body as JSON (`{}` when empty); 422 if it is not JSON."""
    raw = request.get_data(cache=True)
    if not raw or not raw.strip():
        return {}
    try:
        return json.loads(raw)
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
    if isinstance(body, BaseModel):
        text = body.model_dump_json()
    else:
        text = _adapter(type(body)).dump_json(body).decode()
    response = Response(text, status=status, mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
