"""Faults on MariaDB + Redis (SPEC §8): while clients create, transition and post, the
database refuses connections or Redis restarts. Every answer is then a success, an
expected conflict, or a retryable 503 with `Retry-After` — never a 500 — and once the
service is back the next request succeeds, with no Idempotency-Key left stuck."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from app.clients.service import ClientService
from app.factory import create_app
from app.runtime import Runtime, build_runtime, set_runtime
from app.sessions.models import Session
from app.transfers.models import Transfer
from tasks.detection import drain_in_process, in_process_detection
from tests.hostile.faults import PrivateRedis, TcpProxy

pytestmark = [pytest.mark.services, pytest.mark.slow]
EXPECTED = {200, 201, 409, 503}


@pytest.fixture
def proxied(backend: Any, runtime: Runtime, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A runtime whose database is reached through a proxy we can cut, and whose Redis
    is a server of this test's own (restartable), with a bot and a desk client."""
    url = sa.engine.make_url(backend.database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 3306).start()
    redis_server = PrivateRedis(tmp_path).start()
    settings = backend.settings(
        tmp_path, database_url=url.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False),
        redis_url=redis_server.url)
    rt = build_runtime(settings)
    rt._schema_checked = True
    set_runtime(rt)
    app = create_app(rt, TESTING=True)
    clients = ClientService(rt.database)
    bot = clients.create(name="fault-bot", role="bot")
    desk = clients.create(name="fault-desk", role="desk")
    try:
        yield {"runtime": rt, "app": app, "proxy": proxy, "redis": redis_server,
               "bot": bot.token, "desk": desk.token}
    finally:
        set_runtime(runtime)
        rt.close()
        proxy.cut()
        redis_server.stop()


class Traffic:
    """Threads creating (with Idempotency-Keys), pausing/resuming, posting and reading,
    recording every answer, until stopped."""

    def __init__(self, world: dict[str, Any], threads: int = 4) -> None:
        self.world = world
        self.answers: Counter[int] = Counter()
        self.bad: list[str] = []
        self.failed_keys: list[tuple[str, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                         for n in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _record(self, response: Any, what: str) -> None:
        with self._lock:
            self.answers[response.status_code] += 1
            if response.status_code not in EXPECTED:
                self.bad.append(f"{what}: {response.status_code} {response.get_data()[:200]!r}")
            elif response.status_code == 503:
                problem = response.get_json()
                if (response.headers.get("Retry-After") is None
                        or response.mimetype != "application/problem+json"
                        or not problem.get("type", "").startswith("/problems/")):
                    self.bad.append(f"{what}: 503 without Retry-After/problem: {problem}")

    def _run(self, n: int) -> None:
        client = self.world["app"].test_client()
        bot = {"Authorization": f"Bearer {self.world['bot']}"}
        desk = {"Authorization": f"Bearer {self.world['desk']}"}
        mine: list[str] = []
        while not self._stop.is_set():
            i = next(self._seq)
            key = f"k-{n}-{i}"
            # a third of the creates on a slot of their own (they need the slot lock); the
            # others mostly join a busy slot's line (which needs only the database)
            shop = f"shop-{i % 6}" if i % 3 else f"fresh-{n}-{i}"
            body = {"account_id": "acc", "shop_id": shop,
                    "session_type": "AUTO_BARGAIN" if i % 2 else "AUTO_FOLLOW_UP"}
            created = client.post("/api/v1/sessions", json=body,
                                  headers={**bot, "Idempotency-Key": key})
            self._record(created, "create")
            if created.status_code == 201:
                mine.append(created.get_json()["session_id"])
            elif created.status_code == 503:
                with self._lock:
                    self.failed_keys.append((key, body))
            if mine:
                sid = mine[i % len(mine)]
                for action in ("pause", "resume"):
                    self._record(client.post(f"/api/v1/sessions/{sid}/{action}", json={},
                                             headers=bot), action)
                self._record(client.post(
                    f"/api/v1/sessions/{sid}/messages",
                    json={"messages": [{"content": f"m{i}", "sender_role": "counterpart"}]},
                    headers=bot), "messages")
                self._record(client.get(f"/api/v1/sessions/{sid}", headers=bot), "get")
            self._record(client.get("/api/v1/transfers", headers=desk), "transfers")
            time.sleep(0.01)


def _recovers(world: dict[str, Any]) -> None:
    """After the fault, each kind of request succeeds (one retry allowed: a connection
    dropped inside the 1 s ping window fails its first statement, as documented)."""
    client = world["app"].test_client()
    bot = {"Authorization": f"Bearer {world['bot']}"}
    for _ in range(2):
        answer = client.post("/api/v1/sessions", json={
            "account_id": "acc", "shop_id": "after", "session_type": "AUTO_FOLLOW_UP"},
            headers=bot)
        if answer.status_code != 503:
            break
    assert answer.status_code == 201, answer.get_json()
    assert client.get("/api/v1/sessions", headers=bot).status_code == 200


def _no_stuck_keys(world: dict[str, Any], traffic: Traffic) -> None:
    """A create that answered 503 stored nothing: its retry is evaluated afresh and
    answers 201 (or replays, if the create committed before its answer was lost)."""
    client = world["app"].test_client()
    bot = {"Authorization": f"Bearer {world['bot']}"}
    assert traffic.failed_keys, "the fault produced no failed create to retry"
    for key, body in traffic.failed_keys[:10]:
        retry = client.post("/api/v1/sessions", json=body,
                            headers={**bot, "Idempotency-Key": key})
        assert retry.status_code == 201, (key, retry.get_json())
        again = client.post("/api/v1/sessions", json=body,
                            headers={**bot, "Idempotency-Key": key})
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.get_json()["session_id"] == retry.get_json()["session_id"]


def _one_occupant_per_slot(runtime: Runtime) -> None:
    with runtime.database.read() as db:
        holders = db.execute(
            select(Session.account_id, Session.shop_id, func.count())
            .where(Session.holds_slot.is_(True))
            .group_by(Session.account_id, Session.shop_id)
        ).all()
    assert all(count == 1 for *_, count in holders), holders


def _fault_then_recover(world: dict[str, Any], fault: Any, repair: Any, outage: float) -> None:
    """Traffic runs; the fault strikes for `outage` seconds and is repaired; then every
    answer must have been expected, and the system must have recovered."""
    with Traffic(world) as traffic:
        time.sleep(1.0)
        fault()
        time.sleep(outage)
        repair()
        time.sleep(1.5)
    assert not traffic.bad, traffic.bad[:5]
    assert traffic.answers[503] > 0 and traffic.answers[201] > 0, traffic.answers
    _recovers(world)
    _no_stuck_keys(world, traffic)
    _one_occupant_per_slot(world["runtime"])


def test_a_database_refusing_connections_answers_503s_and_recovers(proxied: dict[str, Any]):
    _fault_then_recover(proxied, proxied["proxy"].cut, proxied["proxy"].restore, 2.0)


def test_redis_restarting_answers_503s_and_recovers(proxied: dict[str, Any]):
    _fault_then_recover(proxied, proxied["redis"].stop, proxied["redis"].start, 1.5)


def test_detection_that_finds_the_database_refusing_runs_again_once_it_is_back(
        proxied: dict[str, Any], caplog: pytest.LogCaptureFixture):
    """The in-process detection queue (the embedded default's worker), on this runtime:
    a counterpart asks for a person, the database refuses connections when detection
    runs, and comes back a moment later; the retry finds the request and transfers."""
    world = proxied
    client = world["app"].test_client()
    bot = {"Authorization": f"Bearer {world['bot']}"}
    created = client.post("/api/v1/sessions", json={
        "account_id": "acc", "shop_id": "detect", "session_type": "AUTO_BARGAIN"}, headers=bot)
    assert created.status_code == 201, created.get_json()
    sid = created.get_json()["session_id"]
    posted = client.post(f"/api/v1/sessions/{sid}/messages", headers=bot, json={"messages": [
        {"message_id": "m-person", "sender_role": "counterpart", "content": "我要转人工"}]})
    assert posted.status_code in (200, 201), posted.get_json()

    world["proxy"].cut()
    try:
        with caplog.at_level(logging.WARNING, logger="tasks.detection"):
            in_process_detection.submit(world["runtime"], [sid])
            assert wait_for(lambda: any("tried again in" in r.getMessage()
                                        for r in caplog.records), 10)
    finally:
        world["proxy"].restore()
    assert drain_in_process(30)
    with world["runtime"].database.read() as db:
        status = db.execute(select(Session.status).where(Session.session_id == sid)
                            ).scalar_one()
        transfers = db.execute(select(func.count()).select_from(Transfer).where(
            Transfer.session_id == sid)).scalar_one()
    assert (str(status), transfers) == ("TRANSFERRED", 1)


def wait_for(condition: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False
