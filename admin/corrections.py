"""Operator corrections (SPEC §11) at the admin doors: the admin API and the console.

    POST /admin/api/sessions/{id}/merge   {"into", "reason", "also"?}   JSON
    POST /admin/api/sessions/{id}/split   {"at_message_id", "reason"}   JSON
    POST /admin/sessions/{id}/merge|split                               the console's forms

Both doors are thin: validate the body (422 naming the field), call
`app.sessions.corrections` with the operator as actor, answer. The API admits a bearer
admin token or the console cookie with its CSRF header (`admin_only`); the console's
forms need a log-in and the CSRF field (`login_required`), and render refusals as the
console's error page.
"""

from __future__ import annotations

from flask import Blueprint, Response, redirect, request, url_for
from pydantic import ValidationError
from werkzeug.wrappers import Response as WerkzeugResponse

from admin import console
from admin.auth import admin_client, admin_only, console_identity
from app.api.http import parse_body, respond, runtime
from app.api.openapi import documented
from app.api.problems import validation_problem
from app.clients.service import ClientIdentity
from app.errors import AutoSessionError
from app.sessions.corrections import (
    MergeOutcome,
    MergeRequest,
    SplitOutcome,
    SplitRequest,
    merge_sessions,
    split_session,
)

api_bp = Blueprint("corrections_api", __name__, url_prefix="/api")
console_bp = Blueprint("corrections_console", __name__, template_folder="templates")
# The console's pages and error page, for the forms' answers.
console_bp.context_processor(console._template_context)
console_bp.register_error_handler(AutoSessionError, console._domain_error)
console_bp.register_error_handler(ValidationError, console._validation_error)


def _merge(session_id: str, body: MergeRequest, operator: ClientIdentity) -> Response:
    outcome = merge_sessions(runtime().sessions, [session_id, *body.also], into=body.into,
                             actor=operator.actor, reason=body.reason, operator=operator.name)
    return respond(outcome)


def _split(session_id: str, body: SplitRequest, operator: ClientIdentity) -> Response:
    outcome = split_session(runtime().sessions, session_id, at_message_id=body.at_message_id,
                            actor=operator.actor, reason=body.reason, operator=operator.name)
    return respond(outcome, status=201)


# ---- the admin API ------------------------------------------------------------------------
@api_bp.post("/sessions/<session_id>/merge")
@documented(summary="Merge an ended session into another of its slot (SPEC §11)",
            tags=("admin",), body=MergeRequest, responses={200: MergeOutcome},
            errors=(401, 403, 404, 409, 422, 503))
@admin_only
def merge(session_id: str) -> Response:
    """Merge this ended session into `into` (and `also` into it too); 200 with `into`."""
    return _merge(session_id, parse_body(MergeRequest), admin_client())


@api_bp.post("/sessions/<session_id>/split")
@documented(summary="Split an ended session before a message (SPEC §11)",
            tags=("admin",), body=SplitRequest, responses={201: SplitOutcome},
            errors=(401, 403, 404, 409, 422, 503))
@admin_only
def split(session_id: str) -> Response:
    """Cut this ended session before `at_message_id`; 201 with both sessions."""
    return _split(session_id, parse_body(SplitRequest), admin_client())


# ---- the console's forms ------------------------------------------------------------------
def _form[M: (MergeRequest, SplitRequest)](model: type[M], fields: tuple[str, ...]) -> M:
    try:
        return model.model_validate({name: request.form.get(name, "") for name in fields})
    except ValidationError as exc:
        raise validation_problem(exc, where="form") from None


@console_bp.post("/sessions/<session_id>/merge")
@console.login_required
def merge_form(session_id: str) -> WerkzeugResponse:
    operator = console_identity()
    assert operator is not None
    body = _form(MergeRequest, ("into", "reason"))
    _merge(session_id, body, operator)
    return redirect(url_for("admin.console.session_page", session_id=body.into))


@console_bp.post("/sessions/<session_id>/split")
@console.login_required
def split_form(session_id: str) -> WerkzeugResponse:
    operator = console_identity()
    assert operator is not None
    _split(session_id, _form(SplitRequest, ("at_message_id", "reason")), operator)
    return redirect(url_for("admin.console.session_page", session_id=session_id))
