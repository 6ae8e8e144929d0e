"""The Redis slot lock's wait: first come, first served, handed over without polling,
and robust to waiters that give up and holders that die (real Redis)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.coordination.slot_locks import _ACQUIRE, POLL_SLICE, RedisSlotLocks, ThreadCommands
from app.errors import SlotBusy, SlotLockUnavailable
from tests.hostile.faults import PrivateRedis

pytestmark = pytest.mark.services


@pytest.fixture
def private(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis server of this test's own: its command counters see only our commands."""
    server = PrivateRedis(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(private: PrivateRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private.url)
    try:
        yield client
    finally:
        client.close()


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


# ---- the lock's commands on a connection of the thread's own --------------------------
def test_each_thread_keeps_one_connection_of_its_own(server: redis.Redis):
    command = ThreadCommands(server)
    mine = {command("CLIENT", "ID") for _ in range(3)}
    theirs: list[int] = []
    other = threading.Thread(target=lambda: theirs.extend(
        command("CLIENT", "ID") for _ in range(3)))
    other.start()
    other.join(10)
    assert len(mine) == 1 and len(set(theirs)) == 1 and mine != set(theirs)


def test_a_lock_is_taken_and_released_through_the_threads_connection(server: redis.Redis):
    locks = locks_of(server)
    before = server.client_list()
    with locks.hold("acc", "own"):
        assert server.get(locks.key("acc", "own")) is not None
        during = server.client_list()
    assert server.get(locks.key("acc", "own")) is None
    # one more client: the lock's own (the test's client keeps its one pooled connection)
    assert len(during) == len(before) + 1
    assert {c["id"] for c in server.client_list()} == {c["id"] for c in during}


def test_a_connection_broken_since_its_last_command_is_replaced_once(
        private: PrivateRedis, server: redis.Redis):
    locks = locks_of(server)
    with locks.hold("acc", "r"):  # the thread's connection is open now
        pass
    private.restart()  # every connection to it is broken
    with locks.hold("acc", "r"):
        assert server.get(locks.key("acc", "r")) is not None
    assert server.get(locks.key("acc", "r")) is None


def test_redis_down_is_the_retryable_503_not_a_retry_loop(
        private: PrivateRedis, server: redis.Redis):
    locks = locks_of(server)
    with locks.hold("acc", "down"):
        pass
    private.stop()
    started = time.monotonic()
    with pytest.raises(SlotLockUnavailable), locks.hold("acc", "down"):
        pass
    assert time.monotonic() - started < 5


def test_a_script_unknown_to_redis_is_sent_in_full(server: redis.Redis):
    locks = locks_of(server)
    with locks.hold("acc", "flushed"):
        server.script_flush()  # the release script is not cached any more
    assert server.get(locks.key("acc", "flushed")) is None
    assert server.script_exists(locks._release.sha) == [True]  # EVAL cached it again


def test_queueing_with_the_token_that_holds_the_lock_answers_held(server: redis.Redis):
    """A SET sent again after its reply was lost finds the lock taken by itself; the
    queueing script then answers 1 instead of queueing the holder behind itself."""
    command = ThreadCommands(server)
    acquire = server.register_script(_ACQUIRE)
    assert command("SET", "lock", "me", "NX", "PX", 10_000) is not None
    assert command("SET", "lock", "me", "NX", "PX", 10_000) is None
    assert command.script(acquire, ["lock", "lock:q"], ["me", 10_000, 20_000]) == 1
    assert command.script(acquire, ["lock", "lock:q"], ["you", 10_000, 20_000]) == 0
    assert server.lrange("lock:q", 0, -1) == [b"you"]
