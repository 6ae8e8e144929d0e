"""The desk queue (SPEC §3.6): transfers ordered by urgency, then age, keyset-paginated."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from pydantic import ConfigDict, Field, field_validator
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session as DbSession

from app.errors import ValidationFailed
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer
from app.transfers.schemas import TransferView
from app.validation import INT64_MAX, BoundaryModel

MAX_PAGE = 200


class TransferFilters(BoundaryModel):
    """`status` defaults to PENDING (the waiting queue); `all` lists every status;
    several statuses are comma-separated; case-insensitive. `agent_id` matches the
    agent a transfer is offered to or was accepted by."""

    model_config = ConfigDict(extra="ignore")

    status: str | None = Field(
        default=None, max_length=80,
        description="PENDING (default), ACCEPTED, COMPLETED, EXPIRED, CANCELLED or all; "
        "comma-separated for several; case-insensitive",
    )
    agent_id: str | None = Field(default=None, min_length=1, max_length=64)
    after: str | None = Field(default=None, max_length=200, description="cursor from `next`")
    limit: int = Field(default=50, ge=1, le=MAX_PAGE)

    @field_validator("status")
    @classmethod
    def _statuses(cls, value: str | None) -> str | None:
        if value is None:
            return None
        names = [part.strip().upper() for part in value.split(",") if part.strip()]
        for name in names:
            if name != "ALL" and name not in TransferStatus.__members__:
                raise ValueError(
                    f"unknown status {name!r}; use PENDING, ACCEPTED, COMPLETED, EXPIRED, "
                    "CANCELLED or all"
                )
        return ",".join(names) or None

    def statuses(self) -> list[TransferStatus] | None:
        """The statuses to select, or None for all."""
        if self.status is None:
            return [TransferStatus.PENDING]
        names = self.status.split(",")
        if "ALL" in names:
            return None
        return [TransferStatus(n) for n in names]


def encode_cursor(t: Transfer) -> str:
    raw = json.dumps([t.urgency, t.created_at.isoformat(), t.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        urgency, created, pk = json.loads(raw)
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None:
            raise ValueError("naive time")
        moment = moment.astimezone(UTC)
        if not (isinstance(urgency, int) and isinstance(pk, int)
                and 0 <= urgency <= 9 and 0 <= pk <= INT64_MAX):
            raise ValueError("out of range")
        return urgency, moment, pk
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error,
            UnicodeDecodeError):
        raise ValidationFailed(
            "invalid cursor", errors=[{"field": "after", "message": "not a cursor from `next`"}]
        ) from None


def list_transfers(
    db: DbSession, filters: TransferFilters
) -> tuple[list[TransferView], str | None]:
    stmt = select(Transfer)
    statuses = filters.statuses()
    if statuses is not None:
        stmt = stmt.where(Transfer.status.in_(statuses))
    if filters.agent_id is not None:
        stmt = stmt.where(
            or_(Transfer.offered_agent_id == filters.agent_id,
                Transfer.agent_id == filters.agent_id)
        )
    if filters.after:
        urgency, created, pk = decode_cursor(filters.after)
        stmt = stmt.where(
            or_(
                Transfer.urgency > urgency,
                and_(Transfer.urgency == urgency, Transfer.created_at > created),
                and_(Transfer.urgency == urgency, Transfer.created_at == created,
                     Transfer.id > pk),
            )
        )
    stmt = stmt.order_by(Transfer.urgency, Transfer.created_at, Transfer.id)
    rows = db.execute(stmt.limit(filters.limit + 1)).scalars().all()
    page = rows[: filters.limit]
    following = encode_cursor(page[-1]) if len(rows) > filters.limit else None
    return [TransferView.model_validate(r) for r in page], following


def get_transfer(db: DbSession, transfer_id: str) -> Transfer | None:
    return db.execute(
        select(Transfer).where(Transfer.transfer_id == transfer_id)
    ).scalar_one_or_none()
