"""Slot locks: per-slot mutual exclusion in Redis, or in-process on the embedded default.

The lock makes contention on one (account_id, shop_id) cheap and orderly; it is not the
last line of defence (a holder can be paused past its TTL: `app.sessions.slot.SlotFence`
refuses its commit). `hold` is taken around every slot transaction; `hold_many` takes
many at once for a sweep batch, with the same keys, so a live request and a sweep
exclude each other.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any, Protocol

import redis
from redis.commands.core import Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from app.errors import SlotBusy, SlotLockUnavailable
from app.observability.metrics import SLOT_LOCK_BUSY, SLOT_LOCK_WAIT

log = logging.getLogger(__name__)

SlotKey = tuple[str, str]


class SlotLocks(Protocol):
    """A provider of per-slot mutual exclusion with a bounded wait and a TTL."""

    def hold(self, account_id: str, shop_id: str) -> AbstractContextManager[None]:
        """The slot's lock for the block; `SlotBusy` after the bounded wait."""
        ...

    def hold_many(self, slots: Iterable[SlotKey]) -> AbstractContextManager[set[SlotKey]]:
        """The locks of as many of `slots` as can be had (a busy slot is left out, not
        waited for past the bounded wait); yields the slots held, releases them together
        at the end of the block."""
        ...


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

    @contextmanager
    def hold_many(self, slots: Iterable[SlotKey]) -> Iterator[set[SlotKey]]:
        """Each free slot's lock through `hold`, in sorted order (two callers never wait
        on each other in a cycle), released in reverse order; a slot still busy after
        the bounded wait is left out."""
        held: set[SlotKey] = set()
        with ExitStack() as stack:
            for slot in sorted(set(slots)):
                try:
                    stack.enter_context(self.hold(*slot))
                except SlotBusy:
                    continue
                held.add(slot)
            yield held


# A fair, cheap wait for a busy slot: the lock key holds the holder's token; callers
# that find it taken queue their token on `<lock>:q` and block (BLPOP) on a wake key of
# their own; a release hands the lock to the head of the queue (sets the lock to its
# token and pushes its wake key) instead of deleting it, so waiters are served in
# arrival order, one Redis round trip each, with no polling. A waiter whose wait ends
# leaves the queue atomically (and passes the lock on if it was handed it meanwhile).
# A holder or waiter that died leaves at most its lock's TTL; waiters look for a free
# lock every `POLL_SLICE` seconds for that case.
_ACQUIRE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return 1 end
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


class ThreadCommands:
    """Single Redis commands on a redis-py connection of the calling thread's own.

    Every slot transaction takes and releases its lock: two commands on the path of every
    create and transition. Through `redis.Redis` each costs ~65 µs of the caller's CPU,
    two thirds of it the client's own layers (argument checks, retry and observability
    wrappers, the pool's get and release: measured in one thread, against ~38 µs for
    the same command on a connection kept by the thread). So the lock's own commands
    are sent on a `Connection` built from the client's pool settings (address, database,
    credentials, timeouts, health checks) and kept per thread and process; redis-py's
    connection connects, parses replies, raises a reply's error and drops itself on a
    broken socket as it does in the pool. A command that finds its kept connection
    broken (Redis restarted since) is sent again once on a new one, as the client's
    retry would; errors are the client's (`RedisError`)."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._local = threading.local()

    def _connection(self) -> Any:
        local = self._local
        pid = os.getpid()
        if getattr(local, "pid", None) != pid:  # a new thread, or a forked child
            local.pid = pid
            local.connection = self._pool.connection_class(**self._pool.connection_kwargs)
        return local.connection

    def __call__(self, *args: Any) -> Any:
        connection = self._connection()
        kept = connection.is_connected
        try:
            connection.send_command(*args)
            return connection.read_response()
        except RedisConnectionError:
            if not kept:
                raise
        connection.send_command(*args)  # it dropped itself: this connects afresh
        return connection.read_response()

    def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """`script` by its SHA (its text sent when Redis does not know it yet)."""
        try:
            return self("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self("EVAL", script.script, len(keys), *keys, *args)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.disconnect()


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
        self._command = ThreadCommands(client)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._leave_or_take = client.register_script(_LEAVE_OR_TAKE)
        self._acquire_many = client.register_script(_ACQUIRE_MANY)
        self._release_many = client.register_script(_RELEASE_MANY)

    def close(self) -> None:
        """Close the calling thread's own connection (`ThreadCommands`)."""
        self._command.close()

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
                released = self._command.script(self._release, keys,
                                                [token, self._ttl_ms, self._wake_prefix])
            except RedisError:
                log.warning("could not release slot lock for (%s, %s)", account_id, shop_id)
            else:
                if released == -1:
                    # The TTL ran out while we worked; the fence kept the data safe.
                    log.warning("slot lock for (%s, %s) expired before release",
                                account_id, shop_id)

    def _wait_for(self, keys: list[str], token: str) -> None:
        """Return once `token` holds the lock; raise SlotBusy after `wait` seconds."""
        # A free lock (the common case) with a plain SET: no script to run in Redis
        # (~4 µs of its CPU instead of ~23); a taken one queues us through the script,
        # which tries the SET again first (and answers 1 if the lock holds our token
        # already: a SET sent again after a lost reply).
        if self._command("SET", keys[0], token, "NX", "PX", self._ttl_ms) is not None:
            return
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
    def hold_many(self, slots: Iterable[SlotKey]) -> Iterator[set[SlotKey]]:
        """The locks of as many of `slots` as are free right now (no waiting: a sweep
        leaves a busy slot for its next run), in one script call (atomic: no order to
        keep); released together, each handed to its first waiter."""
        wanted = list(dict.fromkeys(slots))
        keys = [self.key(a, s) for a, s in wanted]
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
        held = {slot for slot, ok in zip(wanted, results, strict=True) if ok == "1"}
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
