"""Webhooks delivered by a real Celery worker process, started by the commits of a real
gunicorn server (no beat, nobody calling delivery by hand): a burst of commits sends
one delivery task, not one per commit, and loses no event."""

from __future__ import annotations

import time

import httpx
import pytest

from app.delivery.service import claim_kick, kick_started
from tests.api.test_server_e2e import new_token, server  # noqa: F401  (fixture)
from tests.delivery.receiver import WebhookReceiver
from tests.delivery.test_webhooks import create, make_client, subscribe
from tests.sweeps.test_beat_processes import ROOT, start, stop, wait_for

QUEUE = "auto-session"  # tasks.celery_app: task_default_queue (a Redis list on the broker)


def test_the_kick_marker_lets_one_run_through_until_a_run_starts(runtime):
    assert claim_kick(runtime) is True
    assert [claim_kick(runtime) for _ in range(5)] == [False] * 5
    if runtime.redis is not None:
        ttl = runtime.redis.ttl(f"{runtime.settings.redis_key_prefix}:delivery:kick-queued")
        assert 0 < ttl <= 30  # a lost task blocks further kicks for 30 s at most
    kick_started(runtime)
    assert claim_kick(runtime) is True
    kick_started(runtime)


def test_commits_in_a_burst_start_delivery_by_themselves_and_lose_nothing(runtime):
    """On the embedded default delivery runs in a thread started by the commit; a burst
    starts few of them, and the last commit's events arrive too."""
    make_client(runtime, "bot-e", "bot")
    with WebhookReceiver() as receiver:
        subscribe(runtime, "bot-e", receiver.url)
        ids = {create(runtime, "bot-e", shop=f"embedded-{n}").session_id for n in range(30)}
        end = time.monotonic() + 20
        while time.monotonic() < end:
            got = {b["session_id"] for b in receiver.bodies() if b["type"] == "session.activated"}
            if ids <= got:
                break
            time.sleep(0.1)
        assert ids <= got, f"{len(ids - got)} sessions' events never arrived"
        bodies = receiver.bodies()
    assert len({b["event_id"] for b in bodies}) == len(bodies)


@pytest.mark.services


def test_a_burst_of_commits_is_delivered_by_one_worker_task(runtime, server, tmp_path):  # noqa: F811
    base, env = server
    log = tmp_path / "worker.log"
    bot = httpx.Client(base_url=base, timeout=10,
                       headers={"Authorization": f"Bearer {new_token(env, 'bot')}"})

    def create(shop: str) -> str:
        response = bot.post("/api/v1/sessions", json={"account_id": "acc", "shop_id": shop,
                                                      "session_type": "AUTO_BARGAIN"})
        assert response.status_code == 201, response.text
        return str(response.json()["session_id"])

    with bot, WebhookReceiver() as receiver:
        assert bot.put("/api/v1/webhook", json={"url": receiver.url}).status_code == 200
        burst = {create(f"burst-{n}") for n in range(40)}
        # Nothing consumes yet: the first commit queued a task, the other 39 (in either
        # web process) saw it queued.
        assert runtime.redis.llen(QUEUE) == 1

        worker = start(["worker", "--loglevel", "INFO", "--concurrency", "1", "-n",
                        "dlv-test@%h", "--without-mingle", "--without-gossip"],
                       {**env, "PYTHONPATH": str(ROOT)}, log)
        try:
            def delivered(ids: set[str]) -> bool:
                got = {b["session_id"] for b in receiver.bodies()
                       if b["type"] == "session.activated"}
                return ids <= got

            wait_for(lambda: delivered(burst), 40, "the burst to reach the receiver", [log])
            wait_for(lambda: runtime.redis.llen(QUEUE) == 0, 10, "the queue to drain", [log])
            # The run that started cleared the marker: the next commit sends a task again.
            later = create("after-burst")
            wait_for(lambda: delivered({later}), 30,
                     "a commit after the run to be delivered", [log])
        finally:
            stop(worker)
    bodies = receiver.bodies()
    assert len({b["event_id"] for b in bodies}) == len(bodies)  # each event once
    assert log.read_text().count("Task delivery.deliver[") <= 2 * 3  # received + succeeded
