"""The slot: its lock (Redis, or in-process on the embedded default) and its fence.

The lock makes contention on one (account_id, shop_id) cheap and orderly. It is
not the last line of defence: a holder can be paused past its lock's TTL. So
every change is also committed against the slot's fencing token (`Slot.fence`)
and the unique occupant key on `sessions`; a stale holder's commit is refused
by the database.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from sqlalchemy import bindparam, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db import affected_rows, utcnow
from app.errors import FenceRejected, SlotBusy, SlotLockUnavailable
from app.sessions.models import SLOTS

log = logging.getLogger(__name__)

SlotKey = tuple[str, str]


class SlotLocks(Protocol):
    """A provider of per-slot mutual exclusion with a bounded wait and a TTL."""

    def hold(self, account_id: str, shop_id: str) -> AbstractContextManager[None]: ...


class LocalSlotLocks:
    """In-process locks for the embedded default (one process, many threads)."""

    def __init__(self, *, wait: float = 5.0) -> None:
        self._wait = wait
        self._guard = threading.Lock()
        self._locks: dict[SlotKey, threading.Lock] = {}

    def _lock_for(self, key: SlotKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    @contextmanager
    def hold(self, account_id: str, shop_id: str) -> Iterator[None]:
        lock = self._lock_for((account_id, shop_id))
        if not lock.acquire(timeout=self._wait):
            raise SlotBusy(f"slot ({account_id}, {shop_id}) is busy; retry shortly")
        try:
            yield
        finally:
            lock.release()


class RedisSlotLocks:
    """redis-py `Lock` per slot: TTL `ttl` seconds, callers wait at most `wait` seconds.

    If Redis is unreachable the operation fails fast with a retryable 503
    (`SlotLockUnavailable`) before anything is written.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, ttl: float, wait: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl = ttl
        self._wait = wait

    def key(self, account_id: str, shop_id: str) -> str:
        return f"{self._prefix}:slot-lock:{len(account_id)}:{account_id}:{shop_id}"

    @contextmanager
    def hold(self, account_id: str, shop_id: str) -> Iterator[None]:
        lock = self._client.lock(
            self.key(account_id, shop_id),
            timeout=self._ttl,
            blocking_timeout=self._wait,
            sleep=0.005,
            thread_local=False,  # this Lock object lives and dies in one call
        )
        try:
            # A random token (redis-py's default, uuid1, takes libuuid's clock lock).
            acquired = lock.acquire(token=secrets.token_hex(16))
        except RedisError as exc:
            raise SlotLockUnavailable(f"slot lock service unreachable: {exc}") from exc
        if not acquired:
            raise SlotBusy(f"slot ({account_id}, {shop_id}) is busy; retry shortly")
        try:
            yield
        finally:
            try:
                lock.release()
            except LockNotOwnedError:
                # The TTL ran out while we worked; the fence kept the data safe.
                log.warning("slot lock for (%s, %s) expired before release", account_id, shop_id)
            except (LockError, RedisError):
                log.warning("could not release slot lock for (%s, %s)", account_id, shop_id)


# The fence's three statements, built once: they run in every slot transaction, and
# building and cache-keying a construct costs about as much as executing it.
_READ_FENCE = select(SLOTS.c.fence, SLOTS.c.occupant_session_id).where(
    SLOTS.c.account_id == bindparam("account_id"), SLOTS.c.shop_id == bindparam("shop_id")
)
_FIRST_FENCE = sa_insert(SLOTS)
_BUMP_FENCE = (
    update(SLOTS)
    .where(
        SLOTS.c.account_id == bindparam("slot_account_id"),
        SLOTS.c.shop_id == bindparam("slot_shop_id"),
        SLOTS.c.fence == bindparam("fence_read"),
    )
    .values(fence=SLOTS.c.fence + 1)
)


class SlotFence:
    """The fencing token read at the start of a slot transaction and checked at commit.

    The slot row also names the occupant, as of the last committed change: every
    change of occupancy (slot transactions, the bulk sweep) writes it with the fence.
    A slot that was never used has no row; its first change inserts it, and two
    holders racing to do that are told apart by the primary key (the loser is
    refused like a stale fence)."""

    def __init__(self, db: DbSession, account_id: str, shop_id: str) -> None:
        # Core statements on the transaction's connection: no ORM execution layer for
        # rows nobody loads as objects.
        self.conn = db.connection()
        self.account_id = account_id
        self.shop_id = shop_id
        row = self.conn.execute(
            _READ_FENCE, {"account_id": account_id, "shop_id": shop_id}
        ).one_or_none()
        self.exists = row is not None
        self.value: int = row.fence if row is not None else 0
        self.occupant_session_id: str | None = (
            row.occupant_session_id if row is not None else None
        )

    def advance(self, occupant_session_id: str | None) -> None:
        """Bump the fence iff nobody else did since we read it; else refuse the change."""
        values = {"occupant_session_id": occupant_session_id, "updated_at": utcnow()}
        if not self.exists:
            try:
                self.conn.execute(_FIRST_FENCE, {
                    "account_id": self.account_id, "shop_id": self.shop_id, "fence": 1,
                    **values})
            except IntegrityError as exc:
                raise self._refused() from exc
            self.exists = True
        else:
            result = self.conn.execute(_BUMP_FENCE, {
                "slot_account_id": self.account_id, "slot_shop_id": self.shop_id,
                "fence_read": self.value, **values})
            if affected_rows(result) != 1:
                raise self._refused()
        self.value += 1
        self.occupant_session_id = occupant_session_id

    def _refused(self) -> FenceRejected:
        return FenceRejected(
            f"slot ({self.account_id}, {self.shop_id}) was changed by another holder; "
            "the operation was not applied, retry it"
        )


def wait_a_little(attempt: int) -> None:
    """Back-off between retries of a whole slot operation."""
    time.sleep(min(0.01 * (2**attempt), 0.2))
