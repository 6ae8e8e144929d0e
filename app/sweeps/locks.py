"""Locks for sweeps: one per sweep run, and many slot locks taken at once for a batch.

A sweep run lock keeps two beat/worker processes from sweeping the same thing at
the same time (cheap, not needed for correctness: every change is still made under
its slot lock, re-checked and fenced). Slot locks for a batch are taken in one
Redis script call with the same keys and semantics as `RedisSlotLocks`, so a live
request and the sweep exclude each other; a busy slot is simply left for the next
run instead of being waited for.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import redis
from redis.exceptions import RedisError

from app.errors import ServiceUnavailable
from app.sessions.slot import RedisSlotLocks, SlotKey, SlotLocks

log = logging.getLogger(__name__)

# Answers one character per key, "1" taken or "0" busy: one short string to parse
# instead of an array of thousands of replies.
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

_RELEASE_MANY = """
local released = 0
for i, key in ipairs(KEYS) do
  if redis.call('get', key) == ARGV[1] then
    redis.call('del', key)
    released = released + 1
  end
end
return released
"""

_local_run_locks: dict[str, threading.Lock] = {}
_local_guard = threading.Lock()


@contextmanager
def sweep_run_lock(client: redis.Redis | None, name: str, *, ttl: float) -> Iterator[bool]:
    """Yield True if this process may run sweep `name` now, False if another one is."""
    if client is None:
        with _local_guard:
            lock = _local_run_locks.setdefault(name, threading.Lock())
        got = lock.acquire(blocking=False)
        try:
            yield got
        finally:
            if got:
                lock.release()
        return
    run_lock = client.lock(name, timeout=ttl, blocking=False)
    try:
        got = bool(run_lock.acquire())
    except RedisError as exc:
        log.warning("sweep %s: lock service unreachable (%s); skipping this run", name, exc)
        got = False
    try:
        yield got
    finally:
        if got:
            try:
                run_lock.release()
            except RedisError:
                log.warning("sweep %s: run lock expired before release", name)


@contextmanager
def hold_slots(locks: SlotLocks, slots: Iterable[SlotKey]) -> Iterator[set[SlotKey]]:
    """Take the locks of as many of `slots` as are free right now; yield those held.

    Redis: one script call (EVALSHA) doing `SET NX PX` per slot (one round trip, one
    command to encode), released by one script that deletes only keys still holding
    our token (a lock that expired and was re-taken by someone else is left alone).
    Other providers: their own `hold`, one by one.
    """
    wanted = list(dict.fromkeys(slots))
    if isinstance(locks, RedisSlotLocks):
        client = locks._client
        token = secrets.token_hex(16)
        ttl_ms = int(locks._ttl * 1000)
        keys = [locks.key(a, s) for a, s in wanted]
        if not keys:
            yield set()
            return
        try:
            answer = client.register_script(_ACQUIRE_MANY)(keys=keys, args=[token, ttl_ms])
        except RedisError as exc:
            raise ServiceUnavailable(f"slot lock service unreachable: {exc}") from exc
        results = answer.decode() if isinstance(answer, bytes) else str(answer)
        held_keys = [k for k, ok in zip(keys, results, strict=True) if ok == "1"]
        held = {slot for slot, ok in zip(wanted, results, strict=True) if ok == "1"}
        try:
            yield held
        finally:
            if held_keys:
                try:
                    client.register_script(_RELEASE_MANY)(keys=held_keys, args=[token])
                except RedisError:
                    log.warning("could not release %d slot locks; they expire by TTL",
                                len(held_keys))
        return
    with ExitStack() as stack:
        held_local: set[SlotKey] = set()
        for slot in wanted:
            try:
                stack.enter_context(locks.hold(*slot))
            except ServiceUnavailable:
                continue
            held_local.add(slot)
        yield held_local
