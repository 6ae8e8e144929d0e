"""Run locks: one run at a time of a periodic job (a sweep, the retention purge, one
client's webhook delivery) across the processes of a deployment.

Cheap, not needed for correctness: every change such a run makes is still made under
its own lock or condition, re-checked. A run lock keeps a second beat or worker process
from doing the same work twice at the same time. In Redis it lapses after `ttl` (a run
that died holds it at most that long); on the embedded default it is a lock of this
process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

_local_run_locks: dict[str, threading.Lock] = {}
_local_guard = threading.Lock()


@contextmanager
def run_lock(client: redis.Redis | None, name: str, *, ttl: float) -> Iterator[bool]:
    """Yield True if this process may run `name` now, False if another one is (or the
    lock service is unreachable: the run is skipped, the next one tries again)."""
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
    held = client.lock(name, timeout=ttl, blocking=False)
    try:
        got = bool(held.acquire())
    except RedisError as exc:
        log.warning("run lock %s: lock service unreachable (%s); skipping this run", name, exc)
        got = False
    try:
        yield got
    finally:
        if got:
            try:
                held.release()
            except RedisError:
                log.warning("run lock %s: expired before release", name)
