"""`/api/v1/sessions`: create (idempotent), read, list, transitions, transfer, live messages.

Views translate HTTP into one service call; the rules live in `app.sessions.service`
and who-may-do-what in `app.api.access`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, request
from pydantic import BaseModel, ValidationError

from app.api.access import (
    check_may_create,
    control_guard,
    control_of,
    controlled_by,
    may_see_view,
    read_visible,
    viewer_of,
)
from app.api.auth import current_client, require_roles
from app.api.http import parse_body, parse_query, request_json, respond, runtime
from app.api.openapi import documented
from app.api.schemas import MessagesAnswer, MessagesBody, Page, SessionCreated, TransitionBody
from app.clients.idempotency import (
    IdempotencyStore,
    IdempotentReplay,
    check_key,
    request_fingerprint,
)
from app.clients.service import ClientIdentity
from app.db import utcnow
from app.errors import InvalidTransition, SlotOccupied, ValidationFailed
from app.messages.service import LiveMessage
from app.sessions.enums import SenderRole
from app.sessions.queries import SessionFilters, list_sessions
from app.sessions.schemas import CreateOutcome, SessionRequest, SessionView
from app.transfers.enums import TransferTrigger
from app.transfers.schemas import HandBackOutcome, HandBackRequest, TransferRequest, TransferView
from app.validation import field_errors

bp = Blueprint("sessions", __name__, url_prefix="/api/v1/sessions")

TAGS = ("sessions",)
AGENT_HEADER = (
    "X-Agent-Id",
    "desk: the agent posting (instead of `agent_id` in the body)",
    False,
)
IDEMPOTENCY_HEADER = (
    "Idempotency-Key",
    "retry-safe create or hand-back: the same key and body return the first answer; "
    "another body is a 409",
    False,
)


def _created_body(outcome: CreateOutcome) -> SessionCreated:
    # The session view is validated already; only the list of displaced ids is added.
    return SessionCreated.model_construct(
        **dict(outcome.session), preempted=[p.session_id for p in outcome.preempted]
    )


@bp.post("")
@documented(
    summary="Ask for a slot: ACTIVE, preempting a lower robot, or PENDING in line",
    description="Bots create robot session types, the desk human ones, admins both. "
    "With `on_conflict: reject` an occupied slot answers 409 describing the occupant.",
    tags=TAGS, body=SessionRequest, responses={201: SessionCreated}, errors=(409, 503),
    headers=(IDEMPOTENCY_HEADER,),
)
@require_roles("bot", "desk", "admin")
def create_session() -> Response:
    client = current_client()
    session_request = parse_body(SessionRequest)
    check_may_create(client, session_request.session_type)
    if client.is_bot and session_request.owner_id is None:
        session_request = session_request.model_copy(update={"owner_id": client.client_id})
    try:
        return _create(client, session_request, request.headers.get("Idempotency-Key"))
    except SlotOccupied as occupied:
        raise occupied.for_viewer(may_see_view(client, occupied.occupant)) from None


def _create(client: ClientIdentity, session_request: SessionRequest, key: str | None) -> Response:
    def run(keep: Keep | None) -> SessionCreated:
        outcome = runtime().sessions.create(
            session_request, actor=client.actor, client_id=client.client_id,
            in_transaction=None if keep is None else (
                lambda db, done: keep(db, _created_body(done))))
        return _created_body(outcome)

    return idempotent(client, key, "POST /api/v1/sessions",
                      session_request.model_dump(mode="json"), run)


Keep = Callable[[Any, BaseModel], None]


def idempotent(client: ClientIdentity, key: str | None, what: str, payload: Any,
               run: Callable[[Keep | None], BaseModel],
               replay_after: tuple[type[Exception], ...] = ()) -> Response:
    """Answer 201 with `run(keep)`; with an Idempotency-Key, `keep(db, answer)` stores the
    answer in the operation's own transaction, and a retry (same key, same `what` and
    `payload`) gets the stored answer with `Idempotent-Replayed: true`. A retry that
    raced its first attempt and lost with one of `replay_after` (the first one changed
    the state it needed) looks once more and replays the answer stored meanwhile."""
    if key is None:
        return respond(run(None), status=201)
    key = check_key(key)
    store = IdempotencyStore(runtime().database)
    fingerprint = request_fingerprint(what, payload)
    stored = store.lookup(client.client_id, key, fingerprint)
    if stored is None:

        def keep(db: Any, answer: BaseModel) -> None:
            store.record(db, client.client_id, key, fingerprint, answer.model_dump(mode="json"))

        try:
            return respond(run(keep), status=201)
        except IdempotentReplay as replay:
            stored = replay.answer
        except replay_after:
            stored = store.lookup(client.client_id, key, fingerprint)
            if stored is None:
                raise
    return respond(stored.body, status=stored.status_code,
                   headers={"Idempotent-Replayed": "true"})


@bp.get("")
@documented(summary="List sessions (a bot sees its own), newest first", tags=TAGS,
            query=SessionFilters, responses={200: Page[SessionView]})
@require_roles("bot", "desk", "admin")
def list_all() -> Response:
    filters = parse_query(SessionFilters)
    with runtime().database.read() as db:
        items, following = list_sessions(db, filters, viewer_of(current_client()))
    return respond(Page[SessionView](items=items, next=following))


@bp.get("/<session_id>")
@documented(summary="One session", tags=TAGS, responses={200: SessionView}, errors=(404,))
@require_roles("bot", "desk", "admin")
def get_one(session_id: str) -> Response:
    with runtime().database.connect() as conn:
        view = read_visible(conn, current_client(), session_id)
    return respond(view)


@bp.post("/<session_id>/heartbeat")
@documented(summary="Keep the session alive; answers its current status", tags=TAGS,
            responses={200: SessionView}, errors=(404, 503))
@require_roles("bot", "desk", "admin")
def heartbeat(session_id: str) -> Response:
    client = current_client()
    # A bot whose session went to the desk learns the status, and its heartbeat does not
    # keep the human conversation alive (`control_of` answers False: nothing changes).
    return respond(runtime().sessions.heartbeat(
        session_id, actor=client.actor, control=control_of(client, messages=False),
        controlled_if=controlled_by(client, messages=False)))


def _transition(session_id: str, action: str) -> Response:
    client = current_client()
    body = parse_body(TransitionBody)
    service = runtime().sessions
    guard = control_guard(client, action)
    if action == "pause":
        view = service.pause(session_id, actor=client.actor, reason=body.reason, guard=guard)
    elif action == "resume":
        view = service.resume(session_id, actor=client.actor, reason=body.reason, guard=guard)
    elif action == "complete":
        view = service.complete(session_id, actor=client.actor, reason=body.reason,
                                result=body.result, guard=guard)
    else:
        view = service.cancel(session_id, actor=client.actor, reason=body.reason, guard=guard)
    return respond(view)


def _transition_view(action: str, summary: str) -> None:
    def view(session_id: str) -> Response:
        return _transition(session_id, action)

    view.__name__ = f"{action}_session"
    decorated = documented(summary=summary, tags=TAGS, body=TransitionBody,
                           responses={200: SessionView}, errors=(404, 409, 503))(
        require_roles("bot", "desk", "admin")(view)
    )
    bp.add_url_rule(f"/<session_id>/{action}", endpoint=f"{action}_session",
                    view_func=decorated, methods=["POST"])


_transition_view("pause", "Pause (the slot goes to the next in line until the owner resumes)")
_transition_view("resume", "Resume a paused session (takes the slot, preempts, or waits)")
_transition_view("complete", "Complete the session (completes its accepted transfer)")
_transition_view("cancel", "Cancel the session (cancels its open transfer)")


@bp.post("/<session_id>/transfer")
@documented(summary="Hand the session to the human desk (SPEC 3.6)", tags=TAGS,
            body=TransferRequest, responses={201: TransferView},
            errors=(404, 409, 503))
@require_roles("bot", "desk", "admin")
def transfer(session_id: str) -> Response:
    client = current_client()
    transfer_request = parse_body(TransferRequest)
    if "trigger" not in transfer_request.model_fields_set and not client.is_bot:
        transfer_request = transfer_request.model_copy(
            update={"trigger": TransferTrigger.OPERATOR})
    view = runtime().sessions.transfer(session_id, transfer_request, actor=client.actor,
                                       guard=control_guard(client, "transfer"))
    return respond(view, status=201)


@bp.post("/<session_id>/hand-back")
@documented(
    summary="Hand a TRANSFERRED session back (SPEC 12): completes it and its transfer",
    description="With `outcome: needs_robot` a new robot session for the bot that "
    "transferred it (`handed_back_from`, the packet as its context) takes the slot at "
    "once; the bot gets `session.handed_back` with the packet. 409 unless TRANSFERRED; "
    "409 /problems/not-assignee when `agent_id` names another agent than the assignee.",
    tags=TAGS, body=HandBackRequest, responses={201: HandBackOutcome},
    errors=(404, 409, 503), headers=(AGENT_HEADER, IDEMPOTENCY_HEADER),
)
@require_roles("desk", "admin")
def hand_back(session_id: str) -> Response:
    client = current_client()
    hand_back_request = parse_body(HandBackRequest)
    agent_id = agent_of(client, hand_back_request.agent_id)
    if agent_id != hand_back_request.agent_id:
        hand_back_request = hand_back_request.model_copy(update={"agent_id": agent_id})

    def run(keep: Keep | None) -> HandBackOutcome:
        return runtime().sessions.hand_back(session_id, hand_back_request, actor=client.actor,
                                            guard=control_guard(client, "hand back"),
                                            in_transaction=keep)

    return idempotent(client, request.headers.get("Idempotency-Key"),
                      f"POST /api/v1/sessions/{session_id}/hand-back",
                      hand_back_request.model_dump(mode="json"), run,
                      replay_after=(InvalidTransition,))


@bp.post("/<session_id>/messages")
@documented(
    summary="Live messages of the session (while ACTIVE or TRANSFERRED, from its controller)",
    description="Rows as in the history import; `session_id` comes from the URL. A row "
    "without `sender_role` is `robot` from a bot and `human` from the desk; a row without "
    "`sent_at` is stamped with the receipt time. De-duplicated by `message_id` (a stable "
    "hash of the row when absent).",
    tags=TAGS, body=MessagesBody, responses={200: MessagesAnswer}, errors=(404, 409, 503),
    headers=(AGENT_HEADER,),
)
@require_roles("bot", "desk", "admin")
def post_messages(session_id: str) -> Response:
    client = current_client()
    rt = runtime()
    data = request_json()
    problems, rows = _parse_message_rows(client, session_id, data, tz=rt.settings.tz)
    agent_id = agent_of(client, data.get("agent_id") if isinstance(data, dict) else None)
    allowed = control_of(client, messages=True)

    def control(conn: Any, row: Any) -> bool:
        if not allowed(conn, row):
            return False
        _check_rows_fit(rows, row, problems)
        return True

    # the same decision as SQL, for a batch whose rows agree on what they name (one
    # message, as bots post them): `record_messages` may then store it in two round trips
    named = {(account, shop) for _, account, shop in rows}
    outcome = rt.sessions.record_messages(
        session_id, [message for message, _, _ in rows], actor=client.actor, control=control,
        agent_id=agent_id, as_operator=client.is_admin,
        controlled_if=None if problems or len(named) != 1 else controlled_by(
            client, messages=True),
        fits=next(iter(named)) if len(named) == 1 else (None, None))
    return respond(MessagesAnswer(accepted=outcome.accepted, duplicates=outcome.duplicates,
                                  accepted_ids=outcome.accepted_ids, session=outcome.session))


def agent_of(client: ClientIdentity, in_body: Any) -> str | None:
    """The agent a desk request names: `agent_id` in the body (validated with it) or the
    X-Agent-Id header; both must agree. Bots name no agent."""
    header = request.headers.get(AGENT_HEADER[0])
    if header is not None:
        header = header.strip()
        if not 1 <= len(header) <= 64:
            raise ValidationFailed("invalid X-Agent-Id header", errors=[
                {"field": "X-Agent-Id", "message": "1 to 64 characters"}])
    if header is not None and in_body is not None and header != in_body:
        raise ValidationFailed("agent_id and X-Agent-Id name different agents", errors=[
            {"field": "agent_id", "message": f"the X-Agent-Id header says {header!r}"}])
    agent_id: str | None = in_body if in_body is not None else header
    if agent_id is not None and client.is_bot:
        raise ValidationFailed("a bot client names no agent", errors=[
            {"field": "agent_id", "message": "only desk and admin clients name an agent"}])
    return agent_id


ParsedRow = tuple[LiveMessage, str | None, str | None]  # the message, its account and shop


def _parse_message_rows(
    client: ClientIdentity, session_id: str, data: Any, *, tz: Any
) -> tuple[list[dict[str, str]], list[ParsedRow]]:
    """The rows as messages, and the problems found without the session (reported with
    those `_check_rows_fit` finds on it, all in one 422)."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        now = utcnow().isoformat()
        for row in data["messages"]:
            if isinstance(row, dict):
                row.setdefault("session_id", session_id)
                if "sent_at" not in row and "timestamp" not in row:
                    row["sent_at"] = now
    default_role = SenderRole.ROBOT if client.is_bot else SenderRole.HUMAN
    try:
        body = MessagesBody.model_validate(data, context={"tz": tz, "default_role": default_role})
    except ValidationError as exc:
        errors = field_errors(exc)
        raise ValidationFailed(
            "invalid messages: " + ", ".join(sorted({e["field"] for e in errors})), errors=errors
        ) from None
    problems = []
    forbidden_role = SenderRole.HUMAN if client.is_bot else (
        SenderRole.ROBOT if client.is_desk else None)
    for index, row in enumerate(body.messages):
        where = f"messages.{index}"
        if row.session_id != session_id:
            problems.append({"field": f"{where}.session_id",
                             "message": f"must be {session_id} (the URL's session)"})
        if forbidden_role is not None and row.sender_role == forbidden_role:
            problems.append({"field": f"{where}.sender_role",
                             "message": f"a {client.role} client may not send {forbidden_role} "
                             "messages"})
    return problems, [
        (LiveMessage(
            message_id=str(row.message_id),
            sender_role=SenderRole(str(row.sender_role)),
            content=row.content,
            sent_at=row.sent_at,
            sender_id=row.sender_id,
            message_type=row.message_type,
        ), row.account_id, row.shop_id)
        for row in body.messages
    ]


def _check_rows_fit(rows: list[ParsedRow], session: Any,
                    problems: list[dict[str, str]]) -> None:
    """Rows that name an account or shop must name the session's (422 with every
    problem of the batch, sorted by row)."""
    problems = list(problems)
    for index, (_, account_id, shop_id) in enumerate(rows):
        where = f"messages.{index}"
        if account_id is not None and account_id != session.account_id:
            problems.append({"field": f"{where}.account_id",
                             "message": f"the session's account is {session.account_id}"})
        if shop_id is not None and shop_id != session.shop_id:
            problems.append({"field": f"{where}.shop_id",
                             "message": f"the session's shop is {session.shop_id}"})
    if problems:
        problems.sort(key=lambda p: (int(p["field"].split(".")[1]), p["field"]))
        raise ValidationFailed(
            "invalid messages: " + ", ".join(p["field"] for p in problems), errors=problems
        )
