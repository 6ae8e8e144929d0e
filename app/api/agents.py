"""`/api/v1/agents`: presence, skills and capacity of desk agents (read by routing)."""

from __future__ import annotations

from flask import Blueprint, Response

from app.agents.service import AgentFilters, AgentService, AgentUpdate, AgentView
from app.api.auth import require_roles
from app.api.http import parse_body, parse_query, respond, runtime
from app.api.openapi import documented
from app.api.schemas import Page

bp = Blueprint("agents", __name__, url_prefix="/api/v1/agents")
TAGS = ("agents",)


@bp.put("/<agent_id>")
@documented(summary="Create or update an agent (201 when created)", tags=TAGS,
            body=AgentUpdate, responses={200: AgentView, 201: AgentView})
@require_roles("desk", "admin")
def put_agent(agent_id: str) -> Response:
    update = parse_body(AgentUpdate)
    view, created = AgentService(runtime().database).upsert(agent_id, update)
    return respond(view, status=201 if created else 200)


@bp.get("")
@documented(summary="Agents by id, with their current load", tags=TAGS, query=AgentFilters,
            responses={200: Page[AgentView]})
@require_roles("desk", "admin")
def list_agents() -> Response:
    filters = parse_query(AgentFilters)
    items, following = AgentService(runtime().database).list(filters)
    return respond(Page[AgentView](items=items, next=following))


@bp.get("/<agent_id>")
@documented(summary="One agent", tags=TAGS, responses={200: AgentView}, errors=(404,))
@require_roles("desk", "admin")
def get_agent(agent_id: str) -> Response:
    return respond(AgentService(runtime().database).get(agent_id))
