"""Pydantic models at the service boundary: what a caller asks, what it gets back."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
)

from app.sessions.enums import (
    Origin,
    Priority,
    SessionStatus,
    SessionType,
    TaskType,
    TransferStatus,
    TransferTrigger,
)
from app.validation import BoundaryModel, JsonObject, check_json_size

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


def _lower_enum(value: Any) -> Any:
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
    _task = field_validator("task_type", "on_conflict", mode="before")(_lower_enum)


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


class TransferRequest(BoundaryModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    urgency: Priority = Priority.HIGH
    trigger: TransferTrigger = TransferTrigger.ROBOT_REQUEST
    agent_id: str | None = Field(default=None, max_length=64)
    task_state: JsonObject | None = None
    customer_info: JsonObject | None = None
    suggestion: str | None = Field(default=None, max_length=4000)

    _trigger = field_validator("trigger", mode="before")(_lower_enum)


class TransferView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    transfer_id: str
    session_id: str
    status: TransferStatus
    urgency: int
    reason: str
    trigger: TransferTrigger
    requested_agent_id: str | None
    offered_agent_id: str | None
    agent_id: str | None
    escalations: int
    previous_transfer_id: str | None
    task_state: Any | None = None
    customer_info: Any | None = None
    suggestion: str | None = None
    history: Any | None = None
    created_at: datetime
    offered_at: datetime | None
    expires_at: datetime | None
    accepted_at: datetime | None
    ended_at: datetime | None
    first_response_at: datetime | None = None
    first_response_overdue_at: datetime | None = None
    hand_back: Any | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def first_response_overdue(self) -> bool:
        """True once the sweep found no human answer within FIRST_RESPONSE_TIMEOUT of
        the accept (SPEC §12); stays true when the answer comes later."""
        return self.first_response_overdue_at is not None


def check_agent_id(value: str | None) -> str | None:
    """An agent id as the desk names it: 1 to 64 characters, no surrounding spaces."""
    if value is not None and value != value.strip():
        raise ValueError("must not start or end with spaces")
    return value


class HandBackRequest(BoundaryModel):
    """The desk hands a TRANSFERRED session back (SPEC §12). `summary`, `outcome`,
    `next_action` and `context` are the packet: kept on the transfer, sent to the bot
    with `session.handed_back`, and the context of the robot session that resumes
    (`needs_robot`) — so together they obey MAX_JSON_FIELD_BYTES like any free-form
    field. `agent_id` (optional) names the agent handing back: once the transfer is
    accepted it must be the assignee."""

    model_config = ConfigDict(extra="forbid")

    summary: str = Field(min_length=1, max_length=4000,
                         description="what the human learned or did")
    outcome: Literal["resolved", "unresolved", "needs_robot"] = Field(
        description="needs_robot: a new robot session for the bot takes the slot at once")
    next_action: str | None = Field(default=None, max_length=2000,
                                    description="what the robot should do next")
    agent_id: str | None = Field(default=None, min_length=1, max_length=64)
    context: JsonObject | None = Field(default=None, validate_default=True)

    _outcome = field_validator("outcome", mode="before")(_lower_enum)
    _agent = field_validator("agent_id")(check_agent_id)

    @field_validator("context")
    @classmethod
    def _packet_fits(cls, value: dict[str, Any] | None, info: ValidationInfo) -> Any:
        """The whole packet (this context and the texts beside it) fits one JSON field."""
        packet = {key: info.data.get(key) for key in ("summary", "outcome", "next_action")}
        check_json_size({**packet, "context": value})
        return value

    def packet(self) -> dict[str, Any]:
        return {"summary": self.summary, "outcome": self.outcome,
                "next_action": self.next_action, "context": self.context}


class ReassignRequest(BoundaryModel):
    """`POST /api/v1/transfers/{id}/reassign`: hand an open transfer to another agent."""

    model_config = ConfigDict(extra="forbid")

    agent_id: str = Field(min_length=1, max_length=64)
    reason: str | None = Field(default=None, max_length=2000)

    _agent = field_validator("agent_id")(check_agent_id)


class HandBackOutcome(BaseModel):
    """What a hand-back did: the session the desk completed, and the robot session that
    took the conversation back (`outcome: needs_robot`), else null."""

    completed: SessionView
    resumed: SessionView | None = None


class CreateOutcome(BaseModel):
    """What a create did: the new session, and any session it displaced."""

    session: SessionView
    preempted: list[SessionView] = []
