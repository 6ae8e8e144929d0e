"""The slot's fence: the database's last word on who may change a slot.

The slot lock (`app.coordination.slot_locks`) makes contention on one (account_id,
shop_id) cheap and orderly. It is not the last line of defence: a holder can be paused
past its lock's TTL. So every change is also committed against the slot's fencing token
(`Slot.fence`) and the unique occupant key on `sessions`; a stale holder's commit is
refused by the database.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, bindparam, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db import utcnow
from app.errors import FenceRejected
from app.fastsql import Prepared, Record
from app.observability.metrics import FENCE_REJECTIONS
from app.sessions.models import SESSIONS, SLOTS

# The fence's three statements, built once: they run in every slot transaction, and
# building and cache-keying a construct costs about as much as executing it.
# The fence read also brings the named occupant's precedence columns (one round trip):
# a request that only waits in line decides so without loading or locking that row.
_OCCUPANT = SESSIONS.alias("occupant")
_READ_FENCE = (
    select(SLOTS.c.fence, SLOTS.c.occupant_session_id, _OCCUPANT.c.id,
           _OCCUPANT.c.session_type, _OCCUPANT.c.priority, _OCCUPANT.c.requested_at,
           _OCCUPANT.c.status)
    .select_from(SLOTS.outerjoin(
        _OCCUPANT, _OCCUPANT.c.session_id == SLOTS.c.occupant_session_id))
    .where(SLOTS.c.account_id == bindparam("account_id"),
           SLOTS.c.shop_id == bindparam("shop_id"))
)
# The read locks the slot row (and the named occupant's): exclusively for a change of the
# slot, shared for a request that only joins the line (`SessionService.run_on_slot`).
# Every writer of the slot takes that row first, so requests in line and changes of the
# slot are ordered by the database, and none of them can deadlock on the other's rows.
_READ_FENCE_EXCLUSIVE = Prepared(_READ_FENCE.with_for_update())
_READ_FENCE_SHARED = Prepared(_READ_FENCE.with_for_update(read=True))
_FIRST_FENCE = Prepared(sa_insert(SLOTS), values_from_params=True)
_BUMP_FENCE = Prepared(
    update(SLOTS)
    .where(
        SLOTS.c.account_id == bindparam("slot_account_id"),
        SLOTS.c.shop_id == bindparam("slot_shop_id"),
        SLOTS.c.fence == bindparam("fence_read"),
    )
    .values(fence=SLOTS.c.fence + 1),
    values_from_params=True,
)


class SlotFence:
    """The fencing token read at the start of a slot transaction and checked at commit.

    The slot row also names the occupant, as of the last committed change: every
    change of occupancy (slot transactions, the bulk sweep) writes it with the fence.
    A slot that was never used has no row; its first change inserts it, and two
    holders racing to do that are told apart by the primary key (the loser is
    refused like a stale fence).

    `occupant` is the named occupant's precedence columns as read with the fence (None
    when the slot row names nobody): every change of an occupant's status or of
    occupancy advances the fence, so they are current for as long as the fence is.

    The read locks the slot row until the transaction ends: exclusively (`FOR UPDATE`)
    for a change of the slot, shared (`shared=True`, `LOCK IN SHARE MODE`) for a request
    that only joins the line — many of those run at once, and none while the slot
    changes. SQLite has no row locks (the embedded default runs every slot operation
    under the in-process slot lock)."""

    def __init__(self, db: DbSession | Connection, account_id: str, shop_id: str, *,
                 shared: bool = False) -> None:
        # Core statements on the transaction's connection: no ORM execution layer for
        # rows nobody loads as objects.
        self.conn = db.connection() if isinstance(db, DbSession) else db
        self.account_id = account_id
        self.shop_id = shop_id
        self.shared = shared
        row = (_READ_FENCE_SHARED if shared else _READ_FENCE_EXCLUSIVE).one_or_none(
            self.conn, {"account_id": account_id, "shop_id": shop_id})
        self.exists = row is not None
        self.value: int = row.fence if row is not None else 0
        self.occupant_session_id: str | None = (
            row.occupant_session_id if row is not None else None
        )
        self.occupant: Record | None = (
            row if row is not None and row.id is not None else None
        )

    def advance(self, occupant_session_id: str | None) -> None:
        """Bump the fence iff nobody else did since we read it; else refuse the change."""
        assert not self.shared, "a request in line holds the slot row shared: no change"
        values = {"occupant_session_id": occupant_session_id, "updated_at": utcnow()}
        if not self.exists:
            try:
                _FIRST_FENCE.execute(self.conn, {
                    "account_id": self.account_id, "shop_id": self.shop_id, "fence": 1,
                    **values})
            except IntegrityError as exc:
                raise self._refused() from exc
            self.exists = True
        else:
            changed = _BUMP_FENCE.execute(self.conn, {
                "slot_account_id": self.account_id, "slot_shop_id": self.shop_id,
                "fence_read": self.value, **values})
            if changed != 1:
                raise self._refused()
        self.value += 1
        self.occupant_session_id = occupant_session_id

    def _refused(self) -> FenceRejected:
        FENCE_REJECTIONS.inc()
        return FenceRejected(
            f"slot ({self.account_id}, {self.shop_id}) was changed by another holder; "
            "the operation was not applied, retry it"
        )


def wait_a_little(attempt: int) -> None:
    """Back-off between retries of a whole slot operation."""
    time.sleep(min(0.01 * (2**attempt), 0.2))
