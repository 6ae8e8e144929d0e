"""Pydantic models at the transfer service's boundary: a transfer asked for, as seen,
reassigned and handed back (SPEC §3.6, §12)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    computed_field,
    field_validator,
)

from app.sessions.enums import Priority
from app.sessions.schemas import SessionView, lower_enum
from app.transfers.enums import TransferStatus, TransferTrigger
from app.validation import BoundaryModel, JsonObject, check_json_size


class TransferRequest(BoundaryModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    urgency: Priority = Priority.HIGH
    trigger: TransferTrigger = TransferTrigger.ROBOT_REQUEST
    agent_id: str | None = Field(default=None, max_length=64)
    task_state: JsonObject | None = None
    customer_info: JsonObject | None = None
    suggestion: str | None = Field(default=None, max_length=4000)

    _trigger = field_validator("trigger", mode="before")(lower_enum)


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

    _outcome = field_validator("outcome", mode="before")(lower_enum)
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
