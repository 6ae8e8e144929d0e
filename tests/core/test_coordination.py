"""Coordination (`app.coordination`): many slot locks at once for a sweep batch, run
locks and markers — the in-process kinds of the embedded default, and Redis's."""

from __future__ import annotations

import threading

import pytest

from app.coordination.markers import Markers
from app.coordination.run_locks import run_lock
from app.coordination.slot_locks import LocalSlotLocks, RedisSlotLocks


def busy_elsewhere(locks: LocalSlotLocks, slot: tuple[str, str]) -> threading.Event:
    """Hold `slot` in another thread until the returned event is set."""
    taken, done = threading.Event(), threading.Event()

    def hold() -> None:
        with locks.hold(*slot):
            taken.set()
            done.wait(5)

    threading.Thread(target=hold, daemon=True).start()
    assert taken.wait(5)
    return done


def test_hold_many_leaves_a_busy_slot_out_and_releases_the_rest():
    locks = LocalSlotLocks(wait=0.05)
    done = busy_elsewhere(locks, ("acc", "b"))
    try:
        with locks.hold_many([("acc", "c"), ("acc", "b"), ("acc", "a"), ("acc", "a")]) as held:
            assert held == {("acc", "a"), ("acc", "c")}
    finally:
        done.set()
    with locks.hold_many([("acc", "a"), ("acc", "b"), ("acc", "c")]) as held:
        assert len(held) == 3  # everything was released


@pytest.mark.services
def test_redis_hold_many_takes_the_free_slots_and_hands_them_back(runtime):
    locks = runtime.locks
    assert isinstance(locks, RedisSlotLocks)
    with locks.hold("acc", "busy"), locks.hold_many([("acc", "free"), ("acc", "busy")]) as held:
        assert held == {("acc", "free")}
    with locks.hold_many([("acc", "free"), ("acc", "busy")]) as held:
        assert held == {("acc", "free"), ("acc", "busy")}


def test_one_run_at_a_time_in_process():
    with run_lock(None, "t:run", ttl=5) as first, run_lock(None, "t:run", ttl=5) as second:
        assert (first, second) == (True, False)
    with run_lock(None, "t:run", ttl=5) as again:
        assert again


def test_markers_claim_take_and_clear(runtime):
    markers = Markers(runtime.redis)
    key = f"{runtime.settings.redis_key_prefix}:test:marker"
    markers.clear(key)
    assert markers.claim(key, ttl=5) is True
    assert markers.claim(key, ttl=5) is False
    assert markers.take(key) is True
    assert markers.take(key) is False
    markers.set(key, ttl=5)
    markers.clear(key)
    assert markers.claim(key, ttl=5) is True
    markers.clear(key)
