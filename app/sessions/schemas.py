"""Pydantic models at the service boundary: what a caller asks, what it gets back."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
)

from app.sessions.enums import (
    Origin,
    Priority,
    SessionStatus,
    SessionType,
    TaskType,
)
from app.validation import BoundaryModel, JsonObject

IdText = str


def _id_text(value: Any) -> Any:
    """shop_id / account_id: integers are accepted and stored as text."""
    if isinstance(value, bool):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
    return value


def _upper_enum(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def lower_enum(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class SessionRequest(BoundaryModel):
    """A request for the right to talk on a slot."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    account_id: str = Field(
        validation_alias=AliasChoices("account_id", "user_id"), min_length=1, max_length=64
    )
    shop_id: str = Field(min_length=1, max_length=64)
    session_type: SessionType
    task_type: TaskType | None = None
    priority: Priority | None = None
    owner_id: str | None = Field(default=None, max_length=64)
    on_conflict: Literal["queue", "reject"] = "queue"
    reason: str | None = Field(default=None, max_length=2000)
    context: JsonObject | None = None

    _ids = field_validator("account_id", "shop_id", mode="before")(_id_text)
    _type = field_validator("session_type", mode="before")(_upper_enum)
    _task = field_validator("task_type", "on_conflict", mode="before")(lower_enum)


class SessionView(BaseModel):
    """A session as clients see it (SPEC §8 field names)."""

    model_config = ConfigDict(from_attributes=True)

    session_id: str
    account_id: str
    shop_id: str
    session_type: SessionType
    task_type: TaskType
    priority: int
    status: SessionStatus
    owner_id: str | None
    client_id: str | None = None
    assigned_agent_id: str | None = None
    origin: Origin
    created_at: datetime
    activated_at: datetime | None
    ended_at: datetime | None
    last_activity_at: datetime
    deadline_at: datetime | None
    message_count: int
    robot_message_count: int = 0
    human_message_count: int = 0
    counterpart_message_count: int = 0
    reason: str | None = None
    end_reason: str | None = None
    pause_cause: str | None = None
    merged_into: str | None = None
    split_from: str | None = None
    preempted_by: str | None = None
    interrupted_session_id: str | None = None
    handed_back_from: str | None = None
    handed_back_to: str | None = None
    unanswered: bool = False
    result: Any | None = None
    context: dict[str, Any] | None = None
    # Imported sessions (SPEC §4 step 4): why it starts where it does — thread, reply,
    # gap, review (null for live sessions) — and the source's conversation key
    started_by: Literal["thread", "reply", "gap", "review"] | None = None
    thread_id: str | None = None


class CreateOutcome(BaseModel):
    """What a create did: the new session, and any session it displaced."""

    session: SessionView
    preempted: list[SessionView] = []
