"""Desk agents: presence, skills and capacity (what transfer routing reads, SPEC §3.6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.agents.models import Agent
from app.db import Database, utcnow
from app.errors import NotFound, ValidationFailed
from app.transfers.routing import agent_loads
from app.validation import BoundaryModel

MAX_PAGE = 200


def _lower_text(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class AgentUpdate(BoundaryModel):
    """`PUT /api/v1/agents/{agent_id}`: fields left out keep their value."""

    model_config = ConfigDict(extra="forbid")

    presence: Literal["online", "offline"] | None = None
    skills: list[str] | None = Field(default=None, max_length=100)
    max_concurrent: int | None = Field(default=None, ge=1, le=1000)
    name: str | None = Field(default=None, max_length=128)

    _presence = field_validator("presence", mode="before")(_lower_text)

    @field_validator("skills")
    @classmethod
    def _skills(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = []
        for skill in value:
            text = skill.strip().lower()
            if not text or len(text) > 64:
                raise ValueError("each skill must be 1 to 64 characters")
            cleaned.append(text)
        return sorted(set(cleaned))


class AgentView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    agent_id: str
    name: str | None
    presence: str
    skills: list[str]
    max_concurrent: int | None
    load: int = Field(default=0, description="sessions handled plus transfers offered now")
    updated_at: datetime


class AgentFilters(BoundaryModel):
    model_config = ConfigDict(extra="ignore")

    presence: Literal["online", "offline"] | None = None
    after: str | None = Field(default=None, max_length=64, description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _presence = field_validator("presence", mode="before")(_lower_text)


def _check_agent_id(agent_id: str) -> str:
    text = agent_id.strip()
    if not text or len(text) > 64 or text != agent_id:
        raise ValidationFailed(
            "agent_id must be 1 to 64 characters without surrounding spaces",
            errors=[{"field": "agent_id", "message": "1 to 64 characters, no outer spaces"}],
        )
    return text


class AgentService:
    def __init__(self, database: Database) -> None:
        self.database = database

    def upsert(self, agent_id: str, update: AgentUpdate) -> tuple[AgentView, bool]:
        """Create or change an agent; returns the agent and whether it was created.

        Two first PUTs for one agent may race: the loser's insert hits the primary key
        and it retries as an update."""
        agent_id = _check_agent_id(agent_id)
        for attempt in range(2):
            try:
                return self._upsert_once(agent_id, update)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _upsert_once(self, agent_id: str, update: AgentUpdate) -> tuple[AgentView, bool]:
        with self.database.unit_of_work() as uow:
            agent = uow.session.get(Agent, agent_id, with_for_update=True)
            created = agent is None
            if agent is None:
                agent = Agent(agent_id=agent_id, presence="offline", skills=[])
                uow.session.add(agent)
            if update.presence is not None:
                agent.presence = update.presence
            if update.skills is not None:
                agent.skills = update.skills
            if update.max_concurrent is not None:
                agent.max_concurrent = update.max_concurrent
            if update.name is not None:
                agent.name = update.name
            agent.updated_at = utcnow()
            uow.session.flush()
            load = agent_loads(uow.session, [agent_id])[agent_id]
            view = AgentView.model_validate(agent).model_copy(update={"load": load})
            uow.commit()
        return view, created

    def get(self, agent_id: str) -> AgentView:
        with self.database.read() as db:
            agent = db.get(Agent, agent_id)
            if agent is None:
                raise NotFound(f"agent {agent_id} not found")
            load = agent_loads(db, [agent_id])[agent_id]
            return AgentView.model_validate(agent).model_copy(update={"load": load})

    def list(self, filters: AgentFilters) -> tuple[list[AgentView], str | None]:
        """Agents by id, keyset-paginated; `next` is the last id of the page."""
        with self.database.read() as db:
            stmt = select(Agent)
            if filters.presence is not None:
                stmt = stmt.where(Agent.presence == filters.presence)
            if filters.after:
                stmt = stmt.where(Agent.agent_id > filters.after)
            rows = db.execute(
                stmt.order_by(Agent.agent_id).limit(filters.limit + 1)
            ).scalars().all()
            page = rows[: filters.limit]
            loads = agent_loads(db, [a.agent_id for a in page])
            views = [
                AgentView.model_validate(a).model_copy(update={"load": loads[a.agent_id]})
                for a in page
            ]
        following = page[-1].agent_id if len(rows) > filters.limit else None
        return views, following
