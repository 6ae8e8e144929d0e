"""Markers: small shared facts that coordinate work without locking anything.

`Markers` are named flags — "a delivery run is queued", "run again when you finish",
"a retry is scheduled" — kept in Redis when there is one, so every process of a
deployment sees them, each lapsing after its TTL (a process that died holding one costs
at most that). On the embedded default (no Redis) they live in this process, shared by
its threads, until taken or cleared: the process that sets one is the one that acts on
it. Redis errors reach the caller, which knows what a lost flag costs.

`BusySlots` is a hint of this process alone: slots it saw occupied lately.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import redis

from app.coordination.slot_locks import SlotKey

_local_flags: set[str] = set()
_local_guard = threading.Lock()


class Markers:
    """Named flags in Redis (`client`), or in this process when `client` is None."""

    def __init__(self, client: redis.Redis | None) -> None:
        self.client = client

    def set(self, key: str, *, ttl: float) -> None:
        """Raise the flag `key` (again), for `ttl` seconds."""
        if self.client is None:
            with _local_guard:
                _local_flags.add(key)
            return
        self.client.set(key, "1", px=int(ttl * 1000))

    def claim(self, key: str, *, ttl: float) -> bool:
        """Raise the flag `key` for `ttl` seconds unless it is up; True if we raised it."""
        if self.client is None:
            with _local_guard:
                if key in _local_flags:
                    return False
                _local_flags.add(key)
                return True
        return bool(self.client.set(key, "1", nx=True, px=int(ttl * 1000)))

    def take(self, key: str) -> bool:
        """Lower the flag `key`; True if it was up."""
        if self.client is None:
            with _local_guard:
                if key in _local_flags:
                    _local_flags.discard(key)
                    return True
            return False
        return self.client.getdel(key) is not None

    def clear(self, key: str) -> None:
        """Lower the flag `key`."""
        if self.client is None:
            with _local_guard:
                _local_flags.discard(key)
            return
        self.client.delete(key)


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
