"""The seed's Python API: `AutoSessionManager` over the same service layer as HTTP.

    from app.manager import AutoSessionManager, TaskType, Priority
    manager = AutoSessionManager()
    session = manager.create_robot_session(shop_id=1, user_id="user123",
                                           task_type=TaskType.CONSULTATION)
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from app.api.schemas import AcceptBody, TransitionBody
from app.db import utcnow
from app.errors import NotFound, ValidationFailed
from app.events.feed import MAX_PAGE, EventQuery, EventView, read_feed
from app.events.stream import EventHub
from app.imports.rows import ChatRow, row_error_text
from app.messages.service import LiveMessage
from app.runtime import Runtime, get_runtime
from app.sessions.enums import Priority, SenderRole, SessionStatus, SessionType, TaskType
from app.sessions.rules import DEFAULT_HUMAN_TYPE_BY_TASK, DEFAULT_ROBOT_TYPE_BY_TASK
from app.sessions.schemas import SessionRequest, SessionView
from app.transfers.enums import TransferTrigger
from app.transfers.schemas import (
    HandBackOutcome,
    HandBackRequest,
    ReassignRequest,
    TransferRequest,
    TransferView,
)
from app.validation import field_errors, validated

__all__ = [
    "AutoSessionManager",
    "Priority",
    "ProcessResult",
    "SessionStatus",
    "SessionType",
    "TaskType",
]


class RowError(BaseModel):
    line: int
    error: str


class ProcessResult(BaseModel):
    """What `process_chat_messages` did with a batch."""

    processed_count: int = 0
    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    sessions_created: int = 0
    sessions_updated: int = 0
    conflicts: int = 0
    errors: list[RowError] = []


class AutoSessionManager:
    """Create sessions, hand them to people, feed them messages — from Python."""

    def __init__(self, runtime: Runtime | None = None, *, actor: str = "python-api") -> None:
        self.runtime = runtime or get_runtime()
        self.runtime.ensure_schema()
        self.actor = actor
        self.service = self.runtime.sessions
        self._hub: EventHub | None = None

    # ---- sessions --------------------------------------------------------------------
    def create_robot_session(
        self,
        shop_id: str | int,
        user_id: str | None = None,
        task_type: TaskType | str | None = None,
        priority: Priority | int | None = None,
        *,
        account_id: str | None = None,
        session_type: SessionType | str | None = None,
        owner_id: str | None = None,
        on_conflict: str = "queue",
        reason: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> SessionView:
        """A robot session (AUTO_BARGAIN for negotiation/consultation, else AUTO_FOLLOW_UP)."""
        task = TaskType(task_type) if task_type is not None else None
        kind = SessionType(session_type) if session_type is not None else (
            DEFAULT_ROBOT_TYPE_BY_TASK[task] if task else SessionType.AUTO_BARGAIN
        )
        if not kind.is_robot:
            raise ValidationFailed(
                f"session_type {kind} is not a robot type",
                [{"field": "session_type", "message": "must be AUTO_BARGAIN or AUTO_FOLLOW_UP"}],
            )
        return self._create(shop_id, account_id or user_id, kind, task, priority, owner_id,
                            on_conflict, reason, context)

    def create_human_session(
        self,
        shop_id: str | int,
        user_id: str | None = None,
        task_type: TaskType | str | None = None,
        priority: Priority | int | None = None,
        *,
        account_id: str | None = None,
        session_type: SessionType | str | None = None,
        agent_id: str | None = None,
        on_conflict: str = "queue",
        reason: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> SessionView:
        """A human session (MANUAL_CUSTOMER_SERVICE unless told otherwise)."""
        task = TaskType(task_type) if task_type is not None else None
        kind = SessionType(session_type) if session_type is not None else (
            DEFAULT_HUMAN_TYPE_BY_TASK.get(task, SessionType.MANUAL_CUSTOMER_SERVICE)
            if task else SessionType.MANUAL_CUSTOMER_SERVICE
        )
        if not kind.is_human:
            raise ValidationFailed(
                f"session_type {kind} is not a human type",
                [{"field": "session_type", "message": "must be a MANUAL_* type"}],
            )
        return self._create(shop_id, account_id or user_id, kind, task, priority, agent_id,
                            on_conflict, reason, context)

    def _create(
        self,
        shop_id: str | int,
        account_id: str | None,
        kind: SessionType,
        task: TaskType | None,
        priority: Priority | int | None,
        owner_id: str | None,
        on_conflict: str,
        reason: str | None,
        context: dict[str, Any] | None,
    ) -> SessionView:
        try:
            request = SessionRequest.model_validate({
                "account_id": account_id,
                "shop_id": shop_id,
                "session_type": kind,
                "task_type": task,
                "priority": int(priority) if priority is not None else None,
                "owner_id": owner_id,
                "on_conflict": on_conflict,
                "reason": reason,
                "context": context,
            })
        except ValidationError as exc:
            raise ValidationFailed(row_error_text(exc), field_errors(exc)) from None
        return self.service.create(request, actor=self.actor).session

    def get_session(self, session_id: str) -> SessionView:
        return self.service.get(session_id)

    def pause_session(self, session_id: str, reason: str | None = None) -> SessionView:
        body = validated(TransitionBody, {"reason": reason})
        return self.service.pause(session_id, actor=self.actor, reason=body.reason)

    def resume_session(self, session_id: str, reason: str | None = None) -> SessionView:
        body = validated(TransitionBody, {"reason": reason})
        return self.service.resume(session_id, actor=self.actor, reason=body.reason)

    def complete_session(
        self, session_id: str, reason: str | None = None, result: Any = None
    ) -> SessionView:
        body = validated(TransitionBody, {"reason": reason, "result": result})
        return self.service.complete(session_id, actor=self.actor, reason=body.reason,
                                     result=body.result)

    def cancel_session(self, session_id: str, reason: str | None = None) -> SessionView:
        body = validated(TransitionBody, {"reason": reason})
        return self.service.cancel(session_id, actor=self.actor, reason=body.reason)

    def heartbeat(self, session_id: str) -> SessionView:
        return self.service.heartbeat(session_id, actor=self.actor)

    # ---- transfers -------------------------------------------------------------------
    def transfer_to_human(
        self,
        session_id: str,
        human_user_id: str | None = None,
        reason: str = "transfer requested",
        urgency: Priority | int = Priority.HIGH,
        *,
        trigger: TransferTrigger | str = TransferTrigger.ROBOT_REQUEST,
        task_state: dict[str, Any] | None = None,
        customer_info: dict[str, Any] | None = None,
        suggestion: str | None = None,
    ) -> TransferView:
        """Hand the session to the human desk; `human_user_id` requests a specific agent."""
        request = validated(TransferRequest, {
            "reason": reason,
            "urgency": int(urgency),
            "trigger": str(trigger),
            "agent_id": human_user_id,
            "task_state": task_state,
            "customer_info": customer_info,
            "suggestion": suggestion,
        })
        return self.service.transfer(session_id, request, actor=self.actor)

    def accept_transfer(self, transfer_id: str, agent_id: str) -> TransferView:
        body = validated(AcceptBody, {"agent_id": agent_id})
        return self.service.accept_transfer(transfer_id, agent_id=body.agent_id,
                                            actor=self.actor)

    def reassign_transfer(
        self, transfer_id: str, agent_id: str, reason: str | None = None
    ) -> TransferView:
        """Hand an open transfer to another agent (audited; event `transfer.reassigned`)."""
        body = validated(ReassignRequest, {"agent_id": agent_id, "reason": reason})
        return self.service.reassign_transfer(transfer_id, agent_id=body.agent_id,
                                              reason=body.reason, actor=self.actor)

    def hand_back(
        self,
        session_id: str,
        summary: str,
        outcome: str = "resolved",
        next_action: str | None = None,
        context: dict[str, Any] | None = None,
        *,
        agent_id: str | None = None,
    ) -> HandBackOutcome:
        """Give a TRANSFERRED session back (SPEC §12): it and its transfer complete; with
        `outcome="needs_robot"` the bot's new robot session takes the slot with the
        packet as its context (`result.resumed`)."""
        request = validated(HandBackRequest, {
            "summary": summary, "outcome": outcome, "next_action": next_action,
            "context": context, "agent_id": agent_id,
        })
        return self.service.hand_back(session_id, request, actor=self.actor)

    # ---- messages --------------------------------------------------------------------
    def process_chat_messages(self, messages: Iterable[Mapping[str, Any]]) -> ProcessResult:
        """Store a batch of messages. Rows naming a `session_id` go to that session (a row
        without a sender role is the counterpart's); the others are grouped into sessions
        by the history import rules (SPEC §4)."""
        result = ProcessResult()
        tz = self.runtime.settings.tz
        by_session: dict[str, list[LiveMessage]] = defaultdict(list)
        history: list[tuple[int, ChatRow]] = []
        for line, raw in enumerate(messages, start=1):
            result.processed_count += 1
            try:
                row = ChatRow.model_validate(
                    raw, context={"tz": tz, "default_role": SenderRole.COUNTERPART}
                )
            except ValidationError as exc:
                result.invalid += 1
                result.errors.append(RowError(line=line, error=row_error_text(exc)))
                continue
            if row.session_id:
                by_session[row.session_id].append(LiveMessage(
                    message_id=row.message_id or "",
                    sender_role=SenderRole(row.sender_role or SenderRole.COUNTERPART),
                    content=row.content,
                    sent_at=row.sent_at,
                    sender_id=row.sender_id,
                    message_type=row.message_type,
                ))
            else:
                history.append((line, row))
        for session_id, batch in by_session.items():
            try:
                outcome = self.service.record_messages(session_id, batch, actor=self.actor)
            except NotFound as exc:
                result.invalid += len(batch)
                result.errors.append(RowError(line=0, error=str(exc)))
                continue
            result.inserted += outcome.accepted
            result.duplicates += outcome.duplicates
            if outcome.accepted:
                result.sessions_updated += 1
        if history:
            self._group_history(history, result)
        result.processed_count -= result.invalid
        return result

    def _group_history(self, rows: list[tuple[int, ChatRow]], result: ProcessResult) -> None:
        from app.imports.batch import import_rows

        counts = import_rows(self.runtime, rows, actor="system:import")
        result.inserted += counts.inserted
        result.duplicates += counts.duplicates
        result.sessions_created += counts.sessions_created
        result.sessions_updated += counts.sessions_updated
        result.conflicts += counts.conflicts

    # ---- the live event stream (SPEC §12) --------------------------------------------
    def events(self, after: int | None = None, *,
               idle_timeout: float | None = None) -> Iterator[EventView]:
        """Every event (an operator's scope) after `after` — without it, from the newest
        on — as it commits, in order, nothing missed or repeated (the feed's rules:
        `read_feed`). Woken by this process's one outbox poller (STREAM_POLL_INTERVAL);
        ends once nothing arrived for `idle_timeout` seconds (never, by default)::

            for event in manager.events(after=last_seen):
                handle(event); last_seen = event.event_id
        """
        hub = self._event_hub()
        cursor = hub.head if after is None else validated(EventQuery, {"after": after}).after
        quiet_since = time.monotonic()
        while True:
            with self.runtime.database.read() as db:
                page = read_feed(db, client_id="", role="admin", after=cursor,
                                 limit=MAX_PAGE, now=utcnow())
            yield from page.items
            if page.items:
                cursor, quiet_since = page.next, time.monotonic()
                if len(page.items) == MAX_PAGE:
                    continue
            wait = self.runtime.settings.stream_keepalive_interval
            if idle_timeout is not None:
                wait = idle_timeout - (time.monotonic() - quiet_since)
                if wait <= 0:
                    return
            if not hub.wait_past(cursor, wait) and hub.head > cursor:
                time.sleep(hub.poll_interval)  # the head is past a hole the feed still waits on

    def _event_hub(self) -> EventHub:
        if self._hub is None:
            self._hub = EventHub(self.runtime.database,
                                 poll_interval=self.runtime.settings.stream_poll_interval,
                                 max_streams=self.runtime.settings.stream_max_connections)
            self._hub.start()
            previous = self.runtime.hooks.events_written
            hub = self._hub

            def events_written() -> None:  # commits through this manager wake it at once
                hub.wake()
                previous()

            self.runtime.hooks.events_written = events_written
        return self._hub
