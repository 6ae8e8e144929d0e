"""The Redis slot lock's wait: first come, first served, handed over without polling,
and robust to waiters that give up and holders that die (real Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.coordination.slot_locks import POLL_SLICE, RedisSlotLocks
from app.errors import SlotBusy
from tests.hostile.faults import PrivateRedis

pytestmark = pytest.mark.services


@pytest.fixture
def server(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis server of this test's own: its command counters see only our commands."""
    private = PrivateRedis(tmp_path).start()
    client = redis.Redis.from_url(private.url)
    try:
        yield client
    finally:
        client.close()
        private.stop()


def locks_of(client: redis.Redis, *, ttl: float = 10.0, wait: float = 5.0) -> RedisSlotLocks:
    return RedisSlotLocks(client, prefix="t", ttl=ttl, wait=wait)


def commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def test_waiters_are_served_in_arrival_order_without_polling(server: redis.Redis):
    locks = locks_of(server)
    order: list[int] = []
    holder_in = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with locks.hold("acc", "hot"):
            holder_in.set()
            release.wait(10)

    def waiter(n: int) -> None:
        with locks.hold("acc", "hot"):
            order.append(n)

    first = threading.Thread(target=holder)
    first.start()
    holder_in.wait(5)
    waiters = []
    queue = locks.key("acc", "hot") + ":q"
    for n in range(12):  # arrive one after another: the next starts once this one queued
        thread = threading.Thread(target=waiter, args=(n,))
        thread.start()
        waiters.append(thread)
        deadline = time.monotonic() + 5
        while server.llen(queue) < n + 1 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert server.llen(queue) == n + 1, f"waiter {n} never queued"
    before = commands(server)
    time.sleep(1.0)  # twelve waiters wait a second: each looks at most every POLL_SLICE
    during = commands(server) - before
    release.set()
    for thread in [first, *waiters]:
        thread.join(10)
    assert order == list(range(12))
    # polling every 5 ms (redis-py's Lock) would be ~2,400 commands; a look per slice is
    # at most 2 commands per waiter per slice, plus INFO itself
    assert during <= 12 * 2 * (1.0 / POLL_SLICE + 1) + 5, during


def test_a_waiter_that_gives_up_leaves_the_line(server: redis.Redis):
    locks = locks_of(server, wait=0.3)
    patient = locks_of(server, wait=5.0)
    got: list[str] = []
    with locks.hold("acc", "s"):
        with pytest.raises(SlotBusy), locks.hold("acc", "s"):
            pass  # pragma: no cover - never reached
        thread = threading.Thread(target=lambda: patient.hold("acc", "s").__enter__()
                                  and None or got.append("in"))
        thread.start()
        time.sleep(0.1)
    thread.join(5)
    assert got == ["in"]  # handed to the waiter still in line, not to the one that left
    queue = locks.key("acc", "s") + ":q"
    assert server.llen(queue) == 0


def test_a_dead_holder_lets_the_waiters_in_once_its_lock_expires(server: redis.Redis):
    locks = locks_of(server, ttl=0.5, wait=5.0)
    dead = locks.hold("acc", "d")
    dead.__enter__()  # never released: the process "died"
    started = time.monotonic()
    with locks.hold("acc", "d"):
        waited = time.monotonic() - started
    assert 0.3 < waited < 0.5 + 2 * POLL_SLICE + 1.0
