"""Who may see and who may act on a session (SPEC §8 roles and ownership).

Seeing (`app.sessions.queries.visible_to`): admin all; a bot its own sessions; the
desk human sessions and robot sessions once handed to it.

A session that exists but is not visible answers **404, not 403**: a bot probing
another client's session ids learns nothing about their existence.

Acting: a live robot session (PENDING, ACTIVE, PAUSED) is controlled by the client
that created it; a human session, and a robot session once TRANSFERRED, by the desk
(and admins). Admins may drive any transition, but only the controlling party may
post live messages: a robot never talks over a human and an operator never talks
over a robot. Acting without control answers 409 `/problems/not-in-control` (the
client's role is fine; the session's current state is what refuses it). The check
runs inside the slot transaction (a service `guard`), so it cannot go stale.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, and_, bindparam, false, not_, select, true
from sqlalchemy.orm import object_session

from app.clients.service import ClientIdentity, ClientRole
from app.db import constant, one_of
from app.errors import Forbidden, NotFound, NotInControl
from app.sessions.activity import Control, ControlledIf
from app.sessions.enums import ROBOT_TYPES, SessionStatus, SessionType
from app.sessions.models import READ_SESSION, SESSIONS, Session
from app.sessions.queries import Viewer, visible_to
from app.sessions.schemas import SessionView
from app.sessions.slot_tx import Guard
from app.transfers.models import Transfer


def viewer_of(client: ClientIdentity) -> Viewer:
    return Viewer(client_id=client.client_id, role=str(client.role))


def not_found(session_id: str) -> NotFound:
    return NotFound(f"session {session_id} not found")


def read_visible(conn: Connection, client: ClientIdentity, session_id: str) -> SessionView:
    """One session as `client` may see it (404 otherwise): one Core SELECT of its row,
    no ORM identity map for a row nobody changes."""
    row = READ_SESSION.one_or_none(conn, {"session_id": session_id})
    if row is None or not may_see_row(conn, client, row):
        raise not_found(session_id)
    return SessionView.model_validate(row)


def robot_side(session: Session | SessionView | Row[Any]) -> bool:
    """True while the robot that created the session is the one talking."""
    return session.session_type.is_robot and session.status != (
        SessionStatus.TRANSFERRED
    )


def in_control(client: ClientIdentity, session: Session | SessionView | Row[Any], *,
               messages: bool) -> bool:
    if session.status.is_terminal:
        return True  # the state machine gives the precise answer
    if robot_side(session):
        if client.client_id == session.client_id:
            return True
        return client.is_admin and not messages
    return client.role in (ClientRole.DESK, ClientRole.ADMIN)


def control_guard(client: ClientIdentity, action: str, *, messages: bool = False) -> Guard:
    """A service guard: visible to `client` and controlled by it, checked in the transaction."""

    def guard(session: Session) -> None:
        db = object_session(session)
        assert db is not None
        visible = db.execute(
            select(Session.id).where(Session.id == session.id, visible_to(viewer_of(client)))
        ).first()
        if visible is None:
            raise not_found(session.session_id)
        if not in_control(client, session, messages=messages):
            holder = "the human desk" if not robot_side(session) else "the robot that created it"
            raise NotInControl(
                f"cannot {action} session {session.session_id}: it is {session.status} and "
                f"controlled by {holder}",
                current_status=str(session.status),
            )

    return guard


def _sees_without_transfers(client: ClientIdentity, *, client_id: object, session_type: object,
                            status: object) -> bool:
    """`visible_to` short of its one look-up: admins see all, a client its own sessions,
    the desk human and TRANSFERRED ones."""
    if client.is_admin or (client_id is not None and client_id == client.client_id):
        return True
    return client.is_desk and (SessionType(str(session_type)).is_human
                               or status == SessionStatus.TRANSFERRED)


def may_see_view(client: ClientIdentity, view: dict[str, object]) -> bool:
    """`visible_to` for a session already described as a view (the 409 occupant: a live
    occupant that is not TRANSFERRED has never been handed to the desk, so no look-up)."""
    return _sees_without_transfers(client, client_id=view.get("client_id"),
                                   session_type=view.get("session_type"),
                                   status=view.get("status"))


def may_see_row(conn: Connection, client: ClientIdentity, row: Any) -> bool:
    """`visible_to`, decided on a session row already read (the desk's "a robot session
    once handed to it" needs one look at its transfers, and only then)."""
    if _sees_without_transfers(client, client_id=row.client_id,
                               session_type=row.session_type, status=row.status):
        return True
    return client.is_desk and conn.execute(
        select(Transfer.id).where(Transfer.session_pk == row.id).limit(1)).first() is not None


def controlled_by(client: ClientIdentity, *, messages: bool) -> ControlledIf:
    """`in_control` as a SQL condition on a live session's row (it implies that the
    client may see it), for the one-statement paths' WHERE: the condition is built once
    per role (so its statement is compiled once), the client id is a parameter."""
    return _CONTROL_SQL[(str(client.role), messages)], {"control_client_id": client.client_id}


def _control_sql(role: str, messages: bool) -> ColumnElement[bool]:
    c = SESSIONS.c
    robot_side_sql = and_(one_of(c.session_type, sorted(str(t) for t in ROBOT_TYPES)),
                          c.status != constant(SessionStatus.TRANSFERRED))
    if role == ClientRole.BOT:
        return and_(c.client_id == bindparam("control_client_id"), robot_side_sql)
    if role == ClientRole.DESK or (role == ClientRole.ADMIN and messages):
        return not_(robot_side_sql)
    if role == ClientRole.ADMIN:
        return true()
    return false()


_CONTROL_SQL = {(str(role), messages): _control_sql(str(role), messages)
                for role in ClientRole for messages in (False, True)}


def control_of(client: ClientIdentity, *, messages: bool) -> Control:
    """For the row-locked paths (heartbeats, messages): 404 unless `client` may see the
    session; True when it controls it."""

    def control(conn: Connection, row: Row[Any]) -> bool:
        if not may_see_row(conn, client, row):
            raise not_found(row.session_id)
        return in_control(client, row, messages=messages)

    return control


def check_may_create(client: ClientIdentity, session_type: SessionType) -> None:
    """Bots create robot sessions, the desk human ones, admins both (else 403)."""
    if client.is_bot and not session_type.is_robot:
        raise Forbidden(f"a bot client may only create robot sessions, not {session_type}")
    if client.is_desk and not session_type.is_human:
        raise Forbidden(f"a desk client may only create human sessions, not {session_type}")
