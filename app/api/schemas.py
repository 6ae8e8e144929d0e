"""Request and response bodies of the HTTP API that are not already service models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.imports.rows import ChatRow
from app.sessions.schemas import SessionView
from app.transfers.schemas import check_agent_id
from app.validation import BoundaryModel, JsonValue


class FieldError(BaseModel):
    field: str
    message: str
    type: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details; more members may appear depending on `type`."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class Page[T](BaseModel):
    """A page of a list; pass `next` back as `after` for the following page (null: the end)."""

    items: list[T]
    next: str | None


class SessionCreated(SessionView):
    """The created session, plus the ids of the sessions it displaced (paused/cancelled)."""

    preempted: list[str] = []


class TransitionBody(BoundaryModel):
    """Optional body of pause / resume / complete / cancel."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=255)
    result: JsonValue | None = Field(default=None,
                                     description="complete only: the outcome to keep")


class MessagesBody(BoundaryModel):
    """Live messages for one session; `session_id` comes from the URL."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatRow] = Field(min_length=1, max_length=1000)
    agent_id: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="desk: the agent posting (or the X-Agent-Id header); required for "
        "human messages once the session's transfer is accepted, and only its assignee "
        "may post them (409 /problems/not-assignee); admins naming none post as operator")

    _agent = field_validator("agent_id")(check_agent_id)


class MessagesAnswer(BaseModel):
    accepted: int
    duplicates: int
    accepted_ids: list[str]
    session: SessionView


class AcceptBody(BoundaryModel):
    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=64)


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}
