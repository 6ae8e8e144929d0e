"""Webhooks delivered by a real Celery worker process, started by the commits themselves
(no beat, nobody calling delivery by hand): a burst of commits sends one delivery task,
not one per commit, and loses no event."""

from __future__ import annotations

import pytest

from app.delivery.service import claim_kick, kick_started
from tasks.celery_app import celery, configure
from tests.delivery.receiver import WebhookReceiver
from tests.delivery.test_webhooks import create, make_client, subscribe
from tests.sweeps.test_beat_processes import ROOT, start, stop, wait_for

pytestmark = pytest.mark.services

QUEUE = "auto-session"  # tasks.celery_app: task_default_queue (a Redis list on the broker)


@pytest.fixture
def real_broker(runtime):
    """This process sends tasks to the test Redis, as a web process does in production."""
    before = dict(celery.conf)
    configure(celery, runtime.settings)
    try:
        yield runtime
    finally:
        celery.conf.update(before)


def test_the_kick_marker_lets_one_task_through_until_a_run_starts(runtime):
    assert claim_kick(runtime) is True
    assert [claim_kick(runtime) for _ in range(5)] == [False] * 5
    ttl = runtime.redis.ttl(f"{runtime.settings.redis_key_prefix}:delivery:kick-queued")
    assert 0 < ttl <= 30  # a lost task blocks further kicks for 30 s at most
    kick_started(runtime)
    assert claim_kick(runtime) is True


def test_a_burst_of_commits_is_delivered_by_one_worker_task(backend, real_broker, tmp_path):
    rt = real_broker
    make_client(rt, "bot-w", "bot")
    log = tmp_path / "worker.log"
    with WebhookReceiver() as receiver:
        subscribe(rt, "bot-w", receiver.url)
        burst = [create(rt, "bot-w", shop=f"burst-{n}") for n in range(40)]
        # Nothing consumes yet: the first commit queued a task, the other 39 saw it queued.
        assert rt.redis.llen(QUEUE) == 1

        worker = start(["worker", "--loglevel", "INFO", "--concurrency", "1", "-n",
                        "dlv-test@%h", "--without-mingle", "--without-gossip"],
                       {**backend.env(), "PYTHONPATH": str(ROOT)}, log)
        try:
            def delivered(ids: set[str]) -> bool:
                got = {b["session_id"] for b in receiver.bodies()
                       if b["type"] == "session.activated"}
                return ids <= got

            wait_for(lambda: delivered({s.session_id for s in burst}), 40,
                     "the burst to reach the receiver", [log])
            wait_for(lambda: rt.redis.llen(QUEUE) == 0, 10, "the queue to drain", [log])
            # The run that started cleared the marker: the next commit sends a task again.
            later = create(rt, "bot-w", shop="after-burst")
            wait_for(lambda: delivered({later.session_id}), 30,
                     "a commit after the run to be delivered", [log])
        finally:
            stop(worker)
    bodies = receiver.bodies()
    assert len({b["event_id"] for b in bodies}) == len(bodies)  # each event once
    assert log.read_text().count("Task delivery.deliver[") <= 2 * 3  # received + succeeded
