"""The slot: its lock (Redis, or in-process on the embedded default) and its fence.

The lock makes contention on one (account_id, shop_id) cheap and orderly. It is
not the last line of defence: a holder can be paused past its lock's TTL. So
every change is also committed against the slot's fencing token (`Slot.fence`)
and the unique occupant key on `sessions`; a stale holder's commit is refused
by the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from sqlalchemy import insert as sa_insert
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db import affected_rows, utcnow
from app.errors import FenceRejected, SlotBusy, SlotLockUnavailable
from app.sessions.models import Slot

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
        )
        try:
            acquired = lock.acquire()
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


class SlotFence:
    """The fencing token read at the start of a slot transaction and checked at commit."""

    def __init__(self, db: DbSession, account_id: str, shop_id: str) -> None:
        self.db = db
        self.account_id = account_id
        self.shop_id = shop_id
        self.value = self._read_or_create()

    def _read_or_create(self) -> int:
        stmt = select(Slot.fence).where(
            Slot.account_id == self.account_id, Slot.shop_id == self.shop_id
        )
        fence = self.db.execute(stmt).scalar_one_or_none()
        if fence is not None:
            return fence
        row = {"account_id": self.account_id, "shop_id": self.shop_id, "fence": 0,
               "updated_at": utcnow()}
        bind = self.db.get_bind()
        assert isinstance(bind, Engine)
        if bind.dialect.name == "sqlite":
            # One writer at a time on SQLite: create it inside our own transaction.
            with self.db.begin_nested():
                self.db.execute(sa_insert(Slot).values(**row).prefix_with("OR IGNORE"))
        else:
            # Committed at once on its own connection, so that a holder that stalls
            # never keeps a first-use slot row locked for everyone else.
            try:
                with bind.connect() as conn, conn.begin():
                    conn.execute(sa_insert(Slot).values(**row))
                return 0  # ours, just committed: nobody can have advanced it under our lock
            except IntegrityError:
                pass  # created concurrently; read theirs
        return self.db.execute(stmt).scalar_one()

    def advance(self, occupant_session_id: str | None) -> None:
        """Bump the fence iff nobody else did since we read it; else refuse the change."""
        result = self.db.execute(
            update(Slot)
            .where(
                Slot.account_id == self.account_id,
                Slot.shop_id == self.shop_id,
                Slot.fence == self.value,
            )
            .values(
                fence=Slot.fence + 1,
                occupant_session_id=occupant_session_id,
                updated_at=utcnow(),
            )
            .execution_options(synchronize_session=False)
        )
        if affected_rows(result) != 1:
            raise FenceRejected(
                f"slot ({self.account_id}, {self.shop_id}) was changed by another holder; "
                "the operation was not applied, retry it"
            )
        self.value += 1


def wait_a_little(attempt: int) -> None:
    """Back-off between retries of a whole slot operation."""
    time.sleep(min(0.01 * (2**attempt), 0.2))
