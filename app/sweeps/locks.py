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
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import redis
from redis.exceptions import RedisError

from app.errors import ServiceUnavailable
from app.sessions.slot import RedisSlotLocks, SlotKey, SlotLocks

log = logging.getLogger(__name__)

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

    Redis: `RedisSlotLocks.hold_many` (one script call each way). Other providers:
    their own `hold`, one by one.
    """
    wanted = list(dict.fromkeys(slots))
    if isinstance(locks, RedisSlotLocks):
        with locks.hold_many(wanted) as held:
            yield held
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
