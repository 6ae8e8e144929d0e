"""The OpenAPI 3.1 document, generated from the pydantic models the views declare.

A view declares its contract with `@documented(...)`; `require_roles` marks it as
needing a bearer token. `build_document(app)` walks the app's URL map, so every
blueprint that documents its views (imports, delivery, admin too) appears::

    @bp.post("/api/v1/things")
    @documented(summary="Create a thing", body=ThingRequest, responses={201: ThingView},
                errors=(409,), tags=("things",))
    @require_roles("admin")
    def create_thing() -> Response: ...

Pydantic emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is; shared models go
to `components/schemas` once.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.schemas import Problem

F = TypeVar("F", bound=Callable[..., Any])
REF = "#/components/schemas/{model}"
ERROR_TITLES = {
    400: "Bad request",
    401: "Missing or invalid bearer token",
    403: "The client's role may not call this operation",
    404: "Not found (or not visible to this client)",
    409: "Conflict with the current state",
    410: "Gone: the cursor is past retention (`oldest_cursor` says where to resume)",
    413: "Payload too large",
    422: "Invalid request: `errors` names each bad field",
    503: "Temporarily unavailable; retry (see Retry-After)",
}


@dataclass
class OperationDoc:
    summary: str
    description: str | None = None
    tags: tuple[str, ...] = ()
    body: type[BaseModel] | None = None
    body_content_types: tuple[str, ...] = ("application/json",)
    query: type[BaseModel] | None = None
    responses: Mapping[int, type[BaseModel] | None] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    headers: tuple[tuple[str, str, bool], ...] = ()  # (name, description, required)


def documented(
    *,
    summary: str,
    description: str | None = None,
    tags: Iterable[str] = (),
    body: type[BaseModel] | None = None,
    body_content_types: Iterable[str] = ("application/json",),
    query: type[BaseModel] | None = None,
    responses: Mapping[int, type[BaseModel] | None] | None = None,
    errors: Iterable[int] = (),
    headers: Iterable[tuple[str, str, bool]] = (),
) -> Callable[[F], F]:
    """Attach an operation's contract to a view (read by `build_document`)."""
    doc = OperationDoc(
        summary=summary,
        description=description,
        tags=tuple(tags),
        body=body,
        body_content_types=tuple(body_content_types),
        query=query,
        responses=dict(responses or {200: None}),
        errors=tuple(errors),
        headers=tuple(headers),
    )

    def decorate(view: F) -> F:
        view.openapi = doc  # type: ignore[attr-defined]
        return view

    return decorate


_RULE_PARAM = re.compile(r"<(?:(?P<conv>[a-z]+)(?:\([^)]*\))?:)?(?P<name>\w+)>")


def _path_of(rule: str) -> tuple[str, list[tuple[str, str]]]:
    params = [(m.group("name"), m.group("conv") or "string") for m in _RULE_PARAM.finditer(rule)]
    return _RULE_PARAM.sub(lambda m: "{" + m.group("name") + "}", rule), params


def build_document(app: Flask, *, title: str = "Auto Session API", version: str = "1") -> dict:
    """The whole OpenAPI document of `app`'s documented views."""
    operations: list[tuple[str, str, list[tuple[str, str]], OperationDoc, tuple[str, ...]]] = []
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        view = app.view_functions.get(rule.endpoint)
        doc: OperationDoc | None = getattr(view, "openapi", None)
        if doc is None:
            continue
        path, params = _path_of(rule.rule)
        roles: tuple[str, ...] = getattr(view, "required_roles", ())
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operations.append((path, method.lower(), params, doc, roles))

    wanted: list[tuple[type[BaseModel], Any]] = [(Problem, "serialization")]
    for *_, doc, _roles in operations:
        if doc.body is not None:
            wanted.append((doc.body, "validation"))
        if doc.query is not None:
            wanted.append((doc.query, "validation"))
        wanted.extend((m, "serialization") for m in doc.responses.values() if m is not None)
    unique = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(unique, ref_template=REF)
    components: dict[str, Any] = top.get("$defs", {})

    paths: dict[str, dict[str, Any]] = {}
    for path, method, params, doc, roles in operations:
        operation: dict[str, Any] = {
            "summary": doc.summary,
            "operationId": f"{method}_{re.sub(r'[^a-zA-Z0-9]+', '_', path).strip('_')}",
            "tags": list(doc.tags),
        }
        if doc.description:
            operation["description"] = doc.description
        parameters: list[dict[str, Any]] = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "integer"} if conv == "int" else {"type": "string"},
            }
            for name, conv in params
        ]
        if doc.query is not None:
            parameters.extend(_query_parameters(refs[(doc.query, "validation")], components))
        for name, description, required in doc.headers:
            parameters.append(
                {"name": name, "in": "header", "required": required,
                 "description": description,
                 "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                            "pattern": "^[\\x21-\\x7e]+$"}}
            )
        if parameters:
            operation["parameters"] = parameters
        if doc.body is not None:
            schema = refs[(doc.body, "validation")]
            operation["requestBody"] = {
                "required": True,
                "content": {ct: {"schema": schema} for ct in doc.body_content_types},
            }
        responses: dict[str, Any] = {}
        for status, model in doc.responses.items():
            entry: dict[str, Any] = {"description": _status_text(status)}
            if model is not None:
                entry["content"] = {
                    "application/json": {"schema": refs[(model, "serialization")]}
                }
            responses[str(status)] = entry
        problem_ref = refs[(Problem, "serialization")]
        errors = set(doc.errors) | {422}
        if roles:
            errors |= {401, 403}
            operation["security"] = [{"bearer": []}]
            operation["description"] = (
                (doc.description + "\n\n" if doc.description else "")
                + "Roles: " + ", ".join(roles)
            )
        if not doc.body and not doc.query and not params and not doc.headers:
            errors.discard(422)
        for status in sorted(errors):
            responses[str(status)] = {
                "description": ERROR_TITLES.get(status, "Error"),
                "content": {"application/problem+json": {"schema": problem_ref}},
            }
        operation["responses"] = responses
        paths.setdefault(path, {})[method] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Session broker for chats shared by robots and people. Errors are "
            "RFC 9457 application/problem+json documents.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _query_parameters(ref: dict[str, Any], components: dict[str, Any]) -> list[dict[str, Any]]:
    name = ref["$ref"].rsplit("/", 1)[-1]
    schema = copy.deepcopy(components.get(name, ref))
    required = set(schema.get("required", []))
    out = []
    for prop, prop_schema in schema.get("properties", {}).items():
        description = prop_schema.pop("description", None)
        param: dict[str, Any] = {
            "name": prop, "in": "query", "required": prop in required, "schema": prop_schema,
        }
        if description:
            param["description"] = description
        out.append(param)
    return out


def _status_text(status: int) -> str:
    return {200: "OK", 201: "Created", 202: "Accepted", 204: "No content"}.get(status, "OK")
