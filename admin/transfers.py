"""The desk queue as operators see it: transfers with their age and first-response wait."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from admin.serializers import transfer_json
from app.db import utcnow
from app.sessions.models import Session
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer


def transfer_queue(db: DbSession, *, limit: int = 100,
                   status: TransferStatus = TransferStatus.PENDING) -> list[dict[str, Any]]:
    """Transfers of `status` in desk order (urgency, then age), with their age in seconds.
    ACCEPTED ones (being handled) also say how long they have waited for their first
    human answer (`first_response_wait_seconds`, null once answered), and carry the
    `first_response_overdue` flag (SPEC §12)."""
    now = utcnow()
    rows = db.execute(
        select(Transfer, Session.account_id, Session.shop_id, Session.session_type)
        .join(Session, Session.id == Transfer.session_pk)
        .where(Transfer.status == status)
        .order_by(Transfer.urgency, Transfer.created_at, Transfer.id).limit(limit)
    ).all()
    return [
        {**transfer_json(t), "account_id": account, "shop_id": shop,
         "session_type": str(stype), "age_seconds": (now - t.created_at).total_seconds(),
         "first_response_wait_seconds": (now - t.accepted_at).total_seconds()
         if t.accepted_at is not None and t.first_response_at is None else None}
        for t, account, shop, stype in rows
    ]
