"""`/api/v1/transfers`: the desk queue, the accept race (exactly one winner) and
reassignment to another agent."""

from __future__ import annotations

from flask import Blueprint, Response

from app.api.auth import current_client, require_roles
from app.api.http import parse_body, parse_query, respond, runtime
from app.api.openapi import documented
from app.api.schemas import AcceptBody, Page
from app.errors import NotFound
from app.transfers.queries import TransferFilters, get_transfer, list_transfers
from app.transfers.schemas import ReassignRequest, TransferView

bp = Blueprint("transfers", __name__, url_prefix="/api/v1/transfers")
TAGS = ("transfers",)


@bp.get("")
@documented(summary="The desk queue: by urgency, then age", tags=TAGS, query=TransferFilters,
            responses={200: Page[TransferView]})
@require_roles("desk", "admin")
def queue() -> Response:
    filters = parse_query(TransferFilters)
    with runtime().database.read() as db:
        items, following = list_transfers(db, filters)
    return respond(Page[TransferView](items=items, next=following))


@bp.get("/<transfer_id>")
@documented(summary="One transfer", tags=TAGS, responses={200: TransferView}, errors=(404,))
@require_roles("desk", "admin")
def get_one(transfer_id: str) -> Response:
    with runtime().database.read() as db:
        row = get_transfer(db, transfer_id)
        if row is None:
            raise NotFound(f"transfer {transfer_id} not found")
        return respond(TransferView.model_validate(row))


@bp.post("/<transfer_id>/accept")
@documented(summary="An agent takes the transfer; the first accept wins, later ones get 409",
            tags=TAGS, body=AcceptBody, responses={200: TransferView}, errors=(404, 409, 503))
@require_roles("desk", "admin")
def accept(transfer_id: str) -> Response:
    body = parse_body(AcceptBody)
    view = runtime().sessions.accept_transfer(
        transfer_id, agent_id=body.agent_id, actor=current_client().actor
    )
    return respond(view)


@bp.post("/<transfer_id>/reassign")
@documented(summary="Hand an open transfer to another agent (audited, transfer.reassigned)",
            description="An ACCEPTED transfer changes its assignee: from now on only that "
            "agent's human messages are accepted on the session; a PENDING one is offered "
            "to that agent. 409 for a transfer that has ended.",
            tags=TAGS, body=ReassignRequest, responses={200: TransferView},
            errors=(404, 409, 503))
@require_roles("desk", "admin")
def reassign(transfer_id: str) -> Response:
    body = parse_body(ReassignRequest)
    view = runtime().sessions.reassign_transfer(
        transfer_id, agent_id=body.agent_id, reason=body.reason, actor=current_client().actor
    )
    return respond(view)
