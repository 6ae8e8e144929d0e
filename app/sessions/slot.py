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
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from redis.exceptions import RedisError
from sqlalchemy import bindparam, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db import utcnow
from app.errors import FenceRejected, SlotBusy, SlotLockUnavailable
from app.fastsql import Prepared, Record
from app.observability.metrics import FENCE_REJECTIONS, SLOT_LOCK_BUSY, SLOT_LOCK_WAIT
from app.sessions.models import SESSIONS, SLOTS

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
        started = time.perf_counter()
        if not lock.acquire(timeout=self._wait):
            SLOT_LOCK_BUSY.inc()
            raise SlotBusy(f"slot ({account_id}, {shop_id}) is busy; retry shortly")
        SLOT_LOCK_WAIT.observe(time.perf_counter() - started)
        try:
            yield
        finally:
            lock.release()


# A fair, cheap wait for a busy slot: the lock key holds the holder's token; callers
# that find it taken queue their token on `<lock>:q` and block (BLPOP) on a wake key of
# their own; a release hands the lock to the head of the queue (sets the lock to its
# token and pushes its wake key) instead of deleting it, so waiters are served in
# arrival order, one Redis round trip each, with no polling. A waiter whose wait ends
# leaves the queue atomically (and passes the lock on if it was handed it meanwhile).
# A holder or waiter that died leaves at most its lock's TTL; waiters look for a free
# lock every `POLL_SLICE` seconds for that case.
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
redis.call('rpush', KEYS[2], ARGV[1])
redis.call('pexpire', KEYS[2], ARGV[3])
return 0
"""
# Hand the lock (KEYS[1]) held by ARGV[1] to the next waiter of KEYS[2], or free it.
_HAND_OVER = """
local function hand_over(lock, queue, ttl, wake_prefix)
  local nxt = redis.call('lpop', queue)
  if not nxt then
    redis.call('del', lock)
    return 0
  end
  redis.call('set', lock, nxt, 'PX', ttl)
  redis.call('rpush', wake_prefix .. nxt, '1')
  redis.call('pexpire', wake_prefix .. nxt, ttl)
  return 1
end
"""
_RELEASE = _HAND_OVER + """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
return hand_over(KEYS[1], KEYS[2], ARGV[2], ARGV[3])
"""
# A waiter gives up: leave the queue. Answers 1 when the lock is ours after all (handed
# over just now, or free to take), 0 otherwise.
_LEAVE_OR_TAKE = """
redis.call('lrem', KEYS[2], 0, ARGV[1])
if redis.call('get', KEYS[1]) == ARGV[1] then return 1 end
if ARGV[4] == '1' and redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
# Many slot locks at once, for a sweep batch: take the free ones (no queueing).
_ACQUIRE_MANY = """
local got = {}
for i, key in ipairs(KEYS) do
  if redis.call('set', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    got[i] = '1'
  else
    got[i] = '0'
  end
end
return table.concat(got)
"""
_RELEASE_MANY = _HAND_OVER + """
local released = 0
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then
    hand_over(key, key .. ':q', ARGV[2], ARGV[3])
    released = released + 1
  end
end
return released
"""
POLL_SLICE = 0.25


class RedisSlotLocks:
    """Per-slot locks in Redis: TTL `ttl` seconds, callers wait at most `wait` seconds,
    in arrival order (see the scripts above).

    If Redis is unreachable the operation fails fast with a retryable 503
    (`SlotLockUnavailable`) before anything is written.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, ttl: float, wait: float) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = int(ttl * 1000)
        self._wait = wait
        self._wake_prefix = f"{prefix}:slot-wake:"
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._leave_or_take = client.register_script(_LEAVE_OR_TAKE)
        self._acquire_many = client.register_script(_ACQUIRE_MANY)
        self._release_many = client.register_script(_RELEASE_MANY)

    def key(self, account_id: str, shop_id: str) -> str:
        return f"{self._prefix}:slot-lock:{len(account_id)}:{account_id}:{shop_id}"

    @contextmanager
    def hold(self, account_id: str, shop_id: str) -> Iterator[None]:
        key = self.key(account_id, shop_id)
        keys = [key, key + ":q"]
        token = secrets.token_hex(16)
        started = time.perf_counter()
        try:
            self._wait_for(keys, token)
        except RedisError as exc:
            raise SlotLockUnavailable(f"slot lock service unreachable: {exc}") from exc
        except SlotBusy:
            SLOT_LOCK_BUSY.inc()
            raise SlotBusy(f"slot ({account_id}, {shop_id}) is busy; retry shortly") from None
        SLOT_LOCK_WAIT.observe(time.perf_counter() - started)
        try:
            yield
        finally:
            try:
                released = self._release(keys=keys, args=[token, self._ttl_ms,
                                                          self._wake_prefix])
            except RedisError:
                log.warning("could not release slot lock for (%s, %s)", account_id, shop_id)
            else:
                if released == -1:
                    # The TTL ran out while we worked; the fence kept the data safe.
                    log.warning("slot lock for (%s, %s) expired before release",
                                account_id, shop_id)

    def _wait_for(self, keys: list[str], token: str) -> None:
        """Return once `token` holds the lock; raise SlotBusy after `wait` seconds."""
        queue_ttl = self._ttl_ms + int(self._wait * 1000) + 1000
        if self._acquire(keys=keys, args=[token, self._ttl_ms, queue_ttl]) == 1:
            return
        wake = self._wake_prefix + token
        deadline = time.monotonic() + self._wait
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._leave_or_take(keys=keys, args=[token, self._ttl_ms, 0, "0"]) == 1:
                    return
                raise SlotBusy("slot busy")
            if self._client.blpop([wake], timeout=min(remaining, POLL_SLICE)) is not None:
                return  # handed over: the lock holds our token, with a full TTL
            # Nobody handed it over within the slice: a holder may have died (its lock
            # expired): take a free lock, or keep waiting in line.
            if self._client.get(keys[0]) is None and self._leave_or_take(
                    keys=keys, args=[token, self._ttl_ms, 0, "1"]) == 1:
                return

    @contextmanager
    def hold_many(self, slots: list[SlotKey]) -> Iterator[set[SlotKey]]:
        """The locks of as many of `slots` as are free right now (no waiting: a sweep
        leaves a busy slot for its next run), in one script call; released together,
        each handed to its first waiter."""
        keys = [self.key(a, s) for a, s in slots]
        if not keys:
            yield set()
            return
        token = secrets.token_hex(16)
        try:
            answer = self._acquire_many(keys=keys, args=[token, self._ttl_ms])
        except RedisError as exc:
            raise SlotLockUnavailable(f"slot lock service unreachable: {exc}") from exc
        results = answer.decode() if isinstance(answer, bytes) else str(answer)
        held_keys = [k for k, ok in zip(keys, results, strict=True) if ok == "1"]
        held = {slot for slot, ok in zip(slots, results, strict=True) if ok == "1"}
        try:
            yield held
        finally:
            if held_keys:
                try:
                    self._release_many(keys=held_keys,
                                       args=[token, self._ttl_ms, self._wake_prefix])
                except RedisError:
                    log.warning("could not release %d slot locks; they expire by TTL",
                                len(held_keys))


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

    def __init__(self, db: DbSession, account_id: str, shop_id: str, *,
                 shared: bool = False) -> None:
        # Core statements on the transaction's connection: no ORM execution layer for
        # rows nobody loads as objects.
        self.conn = db.connection()
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


class BusySlots:
    """Slots this process saw occupied lately, when a request on them only joined the
    line: a hint for choosing how to try the next request there (see
    `SessionService.run_on_slot`), never trusted for correctness — a wrong hint costs
    one read. Bounded: at most `size` slots, each for `ttl` seconds."""

    def __init__(self, *, size: int = 4096, ttl: float = 5.0) -> None:
        self._size = size
        self._ttl = ttl
        self._guard = threading.Lock()
        self._seen: OrderedDict[SlotKey, float] = OrderedDict()

    def mark(self, slot: SlotKey) -> None:
        with self._guard:
            self._seen[slot] = time.monotonic() + self._ttl
            self._seen.move_to_end(slot)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def forget(self, slot: SlotKey) -> None:
        with self._guard:
            self._seen.pop(slot, None)

    def __contains__(self, slot: SlotKey) -> bool:
        until = self._seen.get(slot)
        return until is not None and until > time.monotonic()


def wait_a_little(attempt: int) -> None:
    """Back-off between retries of a whole slot operation."""
    time.sleep(min(0.01 * (2**attempt), 0.2))
