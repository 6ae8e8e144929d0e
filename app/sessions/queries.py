"""Read-side queries on sessions: who may see what, filters, keyset pagination.

Kept apart from `service.py` (which owns every write). Visibility is one SQL
condition, used both for one session and for lists, so a list never shows what
a single read would hide:

- admin: every session;
- bot: the sessions it created (`Session.client_id`);
- desk: human sessions, robot sessions that were ever handed to the desk (they have
  a transfer record), and any session it created itself.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from pydantic import ConfigDict, Field, field_validator
from sqlalchemy import ColumnElement, exists, false, or_, select, true
from sqlalchemy.orm import Session as DbSession

from app.errors import ValidationFailed
from app.sessions.enums import HUMAN_TYPES, SessionStatus, SessionType
from app.sessions.models import Session
from app.sessions.schemas import SessionView
from app.transfers.models import Transfer
from app.validation import INT64_MAX, BoundaryModel

MAX_PAGE = 200


@dataclass(frozen=True)
class Viewer:
    """Who reads: a client id and its role ("bot", "desk" or "admin")."""

    client_id: str
    role: str


def _upper(value: Any) -> Any:
    return value.strip().upper() if isinstance(value, str) else value


class SessionFilters(BoundaryModel):
    """Filters of `GET /api/v1/sessions`; enumerations are case-insensitive."""

    model_config = ConfigDict(extra="ignore")

    account_id: str | None = Field(default=None, min_length=1, max_length=64)
    shop_id: str | None = Field(default=None, min_length=1, max_length=64)
    status: SessionStatus | None = None
    session_type: SessionType | None = None
    owner_id: str | None = Field(default=None, min_length=1, max_length=64)
    after: str | None = Field(default=None, max_length=64, description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    _enums = field_validator("status", "session_type", mode="before")(_upper)


def visible_to(viewer: Viewer) -> ColumnElement[bool]:
    """The SQL condition selecting the sessions `viewer` may see."""
    if viewer.role == "admin":
        return true()
    if viewer.role == "bot":
        return Session.client_id == viewer.client_id
    if viewer.role == "desk":
        return or_(
            Session.session_type.in_(sorted(HUMAN_TYPES)),
            Session.client_id == viewer.client_id,
            exists(select(Transfer.id).where(Transfer.session_pk == Session.id)),
        )
    return false()


def encode_cursor(pk: int) -> str:
    return base64.urlsafe_b64encode(f"s{pk}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith("s") or not text[1:].isdigit():
            raise ValueError(text)
        pk = int(text[1:])
        if pk > INT64_MAX:
            raise ValueError(text)
        return pk
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed(
            "invalid cursor", errors=[{"field": "after", "message": "not a cursor from `next`"}]
        ) from None


def list_sessions(
    db: DbSession, filters: SessionFilters, viewer: Viewer
) -> tuple[list[SessionView], str | None]:
    """Newest first, keyset-paginated on the internal id (stable under inserts)."""
    stmt = select(Session).where(visible_to(viewer))
    if filters.account_id is not None:
        stmt = stmt.where(Session.account_id == filters.account_id)
    if filters.shop_id is not None:
        stmt = stmt.where(Session.shop_id == filters.shop_id)
    if filters.status is not None:
        stmt = stmt.where(Session.status == filters.status)
    if filters.session_type is not None:
        stmt = stmt.where(Session.session_type == filters.session_type)
    if filters.owner_id is not None:
        stmt = stmt.where(Session.owner_id == filters.owner_id)
    if filters.after:
        stmt = stmt.where(Session.id < decode_cursor(filters.after))
    rows = db.execute(stmt.order_by(Session.id.desc()).limit(filters.limit + 1)).scalars().all()
    page = rows[: filters.limit]
    following = encode_cursor(page[-1].id) if len(rows) > filters.limit else None
    return [SessionView.model_validate(r) for r in page], following
