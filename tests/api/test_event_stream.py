"""The live event stream (SPEC §12) against real processes: the Procfile's `web` (gunicorn,
threads) and `stream` (gunicorn, gevent, `gunicorn_stream.conf.py`) on MariaDB + Redis,
and `auto-session serve` on the embedded default. Events reach a stream within a second
of their commit, in the feed's scope; a stream resumed after a disconnect (Last-Event-ID
or `after`) misses and repeats nothing while creates keep committing; idle streams get
keep-alive comments; refusals come before the stream starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.clients.service import ClientService
from app.db import utcnow
from app.events.models import EVENTS, Event
from app.events.outbox import event_values
from app.events.stream import EventHub, EventSubscription, Viewer
from app.retention.service import purge_events
from tests.api.sse import SseReader
from tests.api.test_server_e2e import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STREAM = "/api/v1/events/stream"
KEEPALIVE = 1.0
MAX_STREAMS = 6


def _wait_ready(base: str, proc: subprocess.Popen[bytes], path: str = "/healthz") -> None:
    for _ in range(150):
        try:
            if httpx.get(f"{base}{path}", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "died")
        time.sleep(0.2)
    raise RuntimeError(f"{base} did not become ready")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Live:
    def __init__(self, web: str, stream: str, runtime: Any) -> None:
        self.web = web
        self.stream = stream
        self.clients = ClientService(runtime.database)

    def token(self, role: str, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.clients.create(name=name, role=role).token}"}

    def reader(self, auth: dict[str, str], **params: Any) -> SseReader:
        headers = dict(auth)
        if "last_event_id" in params:
            headers["Last-Event-ID"] = str(params.pop("last_event_id"))
        return SseReader(self.stream + STREAM, headers=headers, params=params).start()

    def feed(self, auth: dict[str, str], after: int) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = httpx.get(f"{self.web}/api/v1/events", headers=auth, timeout=10,
                             params={"after": after, "limit": 500}).json()
            items += page["items"]
            if page["next"] == after:
                return items
            after = page["next"]

    def create(self, auth: dict[str, str], account: str, shop: str = "shop",
               session_type: str = "AUTO_BARGAIN") -> dict[str, Any]:
        answer = httpx.post(f"{self.web}/api/v1/sessions", headers=auth, timeout=10, json={
            "account_id": account, "shop_id": shop, "session_type": session_type})
        assert answer.status_code == 201, answer.text
        return answer.json()


def seed_event(runtime: Any) -> None:
    """One committed event for a hub to start from: on an emptied table whose ids go on
    from earlier tests, a hub starting at 0 would take the missing ids below the first
    event for open transactions and wait out the settle window once (README)."""
    with runtime.database.transaction() as conn:
        conn.execute(EVENTS.insert(), [event_values(type="test.seed", at=utcnow(),
                                                    audience="admin")])


@pytest.fixture
def live(runtime, backend) -> Iterator[Live]:  # type: ignore[no-untyped-def]
    """The Procfile's `web` and `stream` processes on this test's database."""
    seed_event(runtime)
    env = {**backend.env(), "STREAM_KEEPALIVE_INTERVAL": str(KEEPALIVE),
           "STREAM_MAX_CONNECTIONS": str(MAX_STREAMS)}
    web_port, stream_port = free_port(), free_port()
    env["STREAM_PORT"] = str(stream_port)
    web = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", "1", "--threads", "4", "--bind",
         f"127.0.0.1:{web_port}", "--no-control-socket", "app.wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stream = subprocess.Popen(
        [str(BIN / "gunicorn"), "--config", "gunicorn_stream.conf.py", "--bind",
         f"127.0.0.1:{stream_port}", "--no-control-socket", "app.stream_wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{web_port}", web)
        _wait_ready(f"http://127.0.0.1:{stream_port}", stream)
        yield Live(f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{stream_port}", runtime)
    finally:
        _stop(stream)
        _stop(web)


def start_cursor(reader: SseReader) -> int:
    first = reader.wait_for(lambda f: f.id is not None and not f.is_event)
    assert first.id is not None
    return first.id


@pytest.mark.services
def test_events_reach_each_stream_within_a_second_in_the_feed_scope(live: Live) -> None:
    bot_a, bot_b = live.token("bot", "bot-a"), live.token("bot", "bot-b")
    desk, admin = live.token("desk", "desk"), live.token("admin", "ops")
    readers = {name: live.reader(auth) for name, auth in
               (("a", bot_a), ("b", bot_b), ("desk", desk), ("admin", admin))}
    try:
        starts = {name: start_cursor(r) for name, r in readers.items()}
        assert all(r.response_headers["content-type"].startswith("text/event-stream")
                   for r in readers.values())

        lags = []
        for i in range(5):
            created = live.create(bot_a, f"acc-{i}")
            committed = time.monotonic()  # the answer comes after the commit
            frame = readers["a"].wait_for(
                lambda f, sid=created["session_id"]: f.is_event and f.data["session_id"] == sid)
            lags.append(frame.at - committed)
            assert frame.event == "session.activated" and frame.id == frame.data["event_id"]
        assert max(lags) < 1.0, lags
        theirs = live.create(bot_b, "acc-b")
        transferred = httpx.post(
            f"{live.web}/api/v1/sessions/{live.feed(bot_a, 0)[0]['session_id']}/transfer",
            headers=bot_a, json={"reason": "wants a human"}, timeout=10)
        assert transferred.status_code in (200, 201), transferred.text

        last_admin = live.feed(admin, starts["admin"])[-1]["event_id"]
        readers["admin"].wait_for(lambda f: f.id is not None and f.id >= last_admin)
        for name, auth in (("a", bot_a), ("b", bot_b), ("admin", admin)):
            expected = [e["event_id"] for e in live.feed(auth, starts[name])]
            readers[name].wait_for(lambda f, last=expected[-1]: f.id is not None
                                   and f.id >= last)
            got = [f.data for f in readers[name].events()]
            assert [e["event_id"] for e in got] == expected, name
            assert got == live.feed(auth, starts[name]), name  # the feed's JSON, verbatim
        assert {e.data["session_id"] for e in readers["b"].events()} == {theirs["session_id"]}

        # the desk: what is addressed to it, and the transferred session's events from the
        # transfer on; never bot b's robot session
        desk_feed = live.feed(desk, starts["desk"])
        readers["desk"].wait_for(lambda f: f.id is not None
                                 and f.id >= desk_feed[-1]["event_id"])
        desk_types = {f.event for f in readers["desk"].events()}
        assert {"transfer.offered", "session.transferred"} <= desk_types, desk_types
        desk_ids = {f.id for f in readers["desk"].events()}
        assert desk_ids <= {e["event_id"] for e in desk_feed}
        assert theirs["session_id"] not in {f.data["session_id"]
                                            for f in readers["desk"].events()}
    finally:
        for reader in readers.values():
            reader.close()


@pytest.mark.services
def test_resuming_after_disconnects_misses_and_repeats_nothing_while_creates_commit(
        live: Live) -> None:
    bot = live.token("bot", "bot")
    stop = threading.Event()
    created: list[str] = []

    def keep_creating() -> None:
        i = 0
        while not stop.is_set():
            created.append(live.create(bot, f"acc-{i}", f"shop-{i % 7}")["session_id"])
            i += 1

    writer = threading.Thread(target=keep_creating, daemon=True)
    first = live.reader(bot)
    start = start_cursor(first)
    writer.start()
    received = []
    reader = first
    try:
        for reconnect in range(4):
            seen = len(reader.events())
            reader.wait_for(lambda f, r=reader, n=seen: f.is_event and len(r.events()) >= n + 3)
            reader.close()
            received.append(reader.events())
            cursor = reader.last_id()
            time.sleep(0.3)  # creates commit while nobody listens
            reader = (live.reader(bot, last_event_id=cursor) if reconnect % 2 == 0
                      else live.reader(bot, after=cursor))
            assert reader.status == 200, reader.body
    finally:
        stop.set()
        writer.join(30)
    try:
        expected = [e["event_id"] for e in live.feed(bot, start)]
        assert len(created) >= 10
        reader.wait_for(lambda f: f.id is not None and f.id >= expected[-1], timeout=15)
        received.append(reader.events())
    finally:
        reader.close()
    ids = [f.id for part in received for f in part]
    assert len(ids) == len(set(ids)), "an event was sent twice"
    assert ids == expected, "an event was missed"
    assert {f.data["session_id"] for part in received for f in part} == set(created)


@pytest.mark.services
def test_an_idle_stream_gets_a_keep_alive_comment_every_interval(live: Live) -> None:
    reader = live.reader(live.token("desk", "desk"))
    try:
        start_cursor(reader)
        time.sleep(3.6 * KEEPALIVE)
        comments = [f for f in reader.frames if f.comment is not None]
        assert 3 <= len(comments) <= 4, reader.frames
        gaps = [b.at - a.at for a, b in zip(comments, comments[1:], strict=False)]
        assert all(0.7 * KEEPALIVE < gap < 1.5 * KEEPALIVE for gap in gaps), gaps
        assert reader.events() == []
    finally:
        reader.close()


@pytest.mark.services
def test_refusals_come_before_the_stream_starts(live: Live, runtime) -> None:  # type: ignore[no-untyped-def]
    bot = live.token("bot", "bot")
    assert httpx.get(live.stream + STREAM, timeout=5).status_code == 401
    bad = httpx.get(live.stream + STREAM, params={"after": "-1"}, headers=bot, timeout=5)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "after"
    bad = httpx.get(live.stream + STREAM, headers={**bot, "Last-Event-ID": "x1"}, timeout=5)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "Last-Event-ID"
    # the console's origin (this host's web PORT, 8000 here) may open it with its cookie;
    # another port of the host or another site may not
    for origin, allowed in (("http://127.0.0.1:8000", True), ("http://127.0.0.1:8999", False),
                            ("https://evil.example", False)):
        for answer in (httpx.options(live.stream + STREAM, headers={"Origin": origin}),
                       httpx.head(live.stream + STREAM, headers={**bot, "Origin": origin})):
            assert answer.headers.get("Access-Control-Allow-Origin") == (
                origin if allowed else None), (origin, answer.headers)
            assert (answer.headers.get("Access-Control-Allow-Credentials") == "true") is allowed
    elsewhere = httpx.get(live.web + STREAM, headers=bot, timeout=5)
    assert elsewhere.status_code == 404 and live.stream.rsplit(":", 1)[1] in (
        elsewhere.json()["detail"])

    # a cursor older than what retention kept: 410 with the oldest cursor, before streaming
    for i in range(3):
        live.create(bot, f"acc-{i}")
    with runtime.database.read() as db:
        ids = list(db.execute(select(Event.id).order_by(Event.id)).scalars())
    purge_events(runtime.database, older_than=timedelta(0), batch=1000, pause_ratio=0)
    live.create(bot, "acc-after-purge")
    feed = httpx.get(f"{live.web}/api/v1/events", params={"after": ids[0]}, headers=bot,
                     timeout=5)
    assert feed.status_code == 410, feed.text
    assert feed.json()["oldest_cursor"] >= ids[-1]
    reader = live.reader(bot, after=ids[0])
    reader.close()
    assert reader.status == 410
    streamed = json.loads(reader.body)
    assert streamed.pop("trace_id") and feed.json().pop("trace_id")  # one per request
    assert streamed == {k: v for k, v in feed.json().items() if k != "trace_id"}
    resumed = live.reader(bot, after=feed.json()["oldest_cursor"])
    try:
        assert resumed.status == 200
    finally:
        resumed.close()


@pytest.mark.services
def test_a_process_serves_at_most_its_maximum_of_streams(live: Live) -> None:
    desk = live.token("desk", "desk")
    for _ in range(MAX_STREAMS + 2):  # a HEAD never streams, and is counted out at once
        assert httpx.head(live.stream + STREAM, headers=desk, timeout=5).status_code == 200
    readers = [live.reader(desk) for _ in range(MAX_STREAMS)]
    try:
        assert [r.status for r in readers] == [200] * MAX_STREAMS
        refused = httpx.get(live.stream + STREAM, headers=desk, timeout=5)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        readers.pop().close()  # the server notices at its next keep-alive
        deadline = time.monotonic() + 5 * KEEPALIVE
        while True:
            again = live.reader(desk)
            again.close()
            if again.status == 200:
                break
            assert time.monotonic() < deadline, "a closed stream was never counted out"
            time.sleep(0.3)
    finally:
        for reader in readers:
            reader.close()


@pytest.mark.services
def test_an_event_behind_an_uncommitted_one_waits_for_it(runtime) -> None:  # type: ignore[no-untyped-def]
    """The feed's late-commit rule on the stream: event 2 commits while event 1's
    transaction is still open; the stream sends neither until 1 commits, then 1 and 2."""
    seed_event(runtime)
    hub = EventHub(runtime.database, poll_interval=0.05, max_streams=5, settle_seconds=30)
    hub.start()
    subscription = EventSubscription(hub, Viewer("ops", "admin"), after=None, keepalive=0.2)
    frames: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        for frame in subscription.frames():
            frames.append(frame)
            if stop.is_set():
                return

    threading.Thread(target=read, daemon=True).start()

    def event(kind: str) -> dict[str, Any]:
        return event_values(type=kind, at=utcnow(), data={"kind": kind})

    try:
        with runtime.database.engine.connect() as slow:
            slow_tx = slow.begin()
            slow.execute(EVENTS.insert(), [event("test.first")])
            with runtime.database.transaction() as fast:
                fast.execute(EVENTS.insert(), [event("test.second")])
            time.sleep(1.0)
            assert not any(b"event: test." in f for f in frames), frames
            slow_tx.commit()
        deadline = time.monotonic() + 10  # the order is the point; a loaded machine is slow
        while b"".join(frames).count(b"event: test.") < 2:
            assert time.monotonic() < deadline, frames
            time.sleep(0.05)
        text = b"".join(frames).decode()
        assert text.index("event: test.first") < text.index("event: test.second")
    finally:
        stop.set()
        hub.stop()


@pytest.mark.sqlite_only
def test_the_embedded_default_serves_the_stream_on_the_web_port(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_", "STREAM_"))}
    env.update(DATA_DIR=str(tmp_path / "data"), STREAM_KEEPALIVE_INTERVAL="1")
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "auto-session"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    readers: list[SseReader] = []
    try:
        _wait_ready(base, server)  # type: ignore[arg-type]
        made = subprocess.run(
            [str(BIN / "auto-session"), "clients", "create", "--name", "bot", "--role", "bot",
             "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
            check=True)
        auth = {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}

        def create(account: str) -> tuple[str, float]:
            answer = httpx.post(f"{base}/api/v1/sessions", headers=auth, timeout=10, json={
                "account_id": account, "shop_id": "shop", "session_type": "AUTO_BARGAIN"})
            assert answer.status_code == 201, answer.text
            return answer.json()["session_id"], time.monotonic()

        first = SseReader(base + STREAM, headers=auth).start()
        readers.append(first)
        start = start_cursor(first)
        sid, committed = create("acc-1")
        frame = first.wait_for(lambda f: f.is_event and f.data["session_id"] == sid)
        assert frame.at - committed < 1.0
        first.wait_for(lambda f: f.comment is not None, timeout=3)  # keep-alive
        first.close()
        missed = [create(f"acc-{i}")[0] for i in range(2, 5)]  # while disconnected
        # the reconnect's Last-Event-ID wins over the URL's `after` (EventSource keeps the URL)
        again = SseReader(base + STREAM, headers={**auth, "Last-Event-ID": str(first.last_id())},
                          params={"after": start})
        readers.append(again.start())
        sid5, _ = create("acc-5")
        again.wait_for(lambda f: f.is_event and f.data["session_id"] == sid5)
        ids = [f.id for f in first.events() + again.events()]
        feed = httpx.get(f"{base}/api/v1/events", params={"after": start}, headers=auth,
                         timeout=5).json()["items"]
        assert ids == [e["event_id"] for e in feed]
        assert [f.data["session_id"] for f in again.events()] == [*missed, sid5]
    finally:
        for reader in readers:
            reader.close()
        _stop(server)  # type: ignore[arg-type]


# ---- the whole desk story on the stream alone (issue 17's "done when") ------------------
def desk_story(web: str, stream: str, bot: dict[str, str], desk: dict[str, str],
               shop: str) -> list[str]:
    """Robot → human → robot over HTTP writes and the two parties' streams alone — no
    feed poll, no read of a session to learn what happened. Answers the bot's event
    types in the order its stream delivered them."""
    bot_stream = SseReader(stream + STREAM, headers=bot).start()
    desk_stream = SseReader(stream + STREAM, headers=desk).start()
    try:
        start_cursor(bot_stream)
        start_cursor(desk_stream)
        http = httpx.Client(base_url=web, timeout=10)
        with http:
            created = http.post("/api/v1/sessions", headers=bot, json={
                "account_id": "acc-story", "shop_id": shop, "session_type": "AUTO_BARGAIN",
                "task_type": "negotiation"})
            assert created.status_code == 201, created.text
            sid = created.json()["session_id"]
            assert http.post(f"/api/v1/sessions/{sid}/transfer", headers=bot, json={
                "reason": "asks for a refund"}).status_code == 201
            # the desk learns of the offer from its stream, and takes it
            offer = desk_stream.wait_for(
                lambda f: f.event == "transfer.offered" and f.data["session_id"] == sid)
            transfer_id = offer.data["data"]["transfer_id"]
            assert http.post(f"/api/v1/transfers/{transfer_id}/accept", headers=desk,
                             json={"agent_id": "li"}).status_code == 200
            desk_stream.wait_for(
                lambda f: f.event == "transfer.accepted" and f.data["session_id"] == sid)
            assert http.post(f"/api/v1/sessions/{sid}/messages",
                             headers={**desk, "X-Agent-Id": "li"},
                             json={"messages": [{"content": "退款 12 元已同意"}]}
                             ).status_code == 200
            handed = http.post(f"/api/v1/sessions/{sid}/hand-back",
                               headers={**desk, "X-Agent-Id": "li", "Idempotency-Key": sid},
                               json={"summary": "refund of 12 agreed", "outcome": "needs_robot",
                                     "next_action": "confirm the refund",
                                     "context": {"refund": 12}})
            assert handed.status_code == 201, handed.text
            # the bot learns of the hand-back, and where to carry on, from its stream
            back = bot_stream.wait_for(
                lambda f: f.event == "session.handed_back" and f.data["session_id"] == sid)
            assert back.data["data"]["context"] == {"refund": 12}
            assert back.data["data"]["next_action"] == "confirm the refund"
            resumed = back.data["data"]["resumed_session_id"]
            bot_stream.wait_for(
                lambda f: f.event == "session.activated" and f.data["session_id"] == resumed)
            posted = http.post(f"/api/v1/sessions/{resumed}/messages", headers=bot,
                               json={"messages": [{"content": "refund confirmed"}]})
            assert posted.status_code == 200 and posted.json()["accepted"] == 1
            assert http.post(f"/api/v1/sessions/{resumed}/complete", headers=bot
                             ).json()["status"] == "COMPLETED"
            bot_stream.wait_for(
                lambda f: f.event == "session.completed" and f.data["session_id"] == resumed)
        return [f.event for f in bot_stream.events() if f.event is not None]
    finally:
        bot_stream.close()
        desk_stream.close()


STORY = ["session.activated", "session.transferred", "session.completed",
         "session.handed_back", "session.activated", "session.completed"]


@pytest.mark.services
def test_a_whole_desk_story_runs_on_the_procfiles_stream(live: Live) -> None:
    bot, desk = live.token("bot", "story-bot"), live.token("desk", "story-desk")
    seen = desk_story(live.web, live.stream, bot, desk, "story-1")
    assert [e for e in seen if e in STORY] == STORY, seen


@pytest.mark.sqlite_only
def test_a_whole_desk_story_runs_on_make_runs_one_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_", "STREAM_"))}
    env.update(DATA_DIR=str(tmp_path / "data"))
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "auto-session"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)  # type: ignore[arg-type]

        def token(role: str) -> dict[str, str]:
            made = subprocess.run(
                [str(BIN / "auto-session"), "clients", "create", "--name", f"story-{role}",
                 "--role", role, "--json"], cwd=tmp_path, env=env, capture_output=True,
                text=True, timeout=60, check=True)
            return {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}

        seen = desk_story(base, base, token("bot"), token("desk"), "story-2")
        assert [e for e in seen if e in STORY] == STORY, seen
    finally:
        _stop(server)  # type: ignore[arg-type]


# ---- a stopping server ends its streams at once ------------------------------------------
def _stops_with_streams_open(server: subprocess.Popen[bytes], base: str,
                             auth: dict[str, str]) -> float:
    """Open two streams, SIGTERM the server's master; answer how long it took to exit,
    after checking that both streams ended (their clients reconnect elsewhere with their
    Last-Event-ID; gunicorn may close a stopping worker's connections either way)."""
    readers = [SseReader(base + STREAM, headers=auth).start() for _ in range(2)]
    for reader in readers:
        start_cursor(reader)
    began = time.monotonic()
    server.terminate()
    server.wait(60)
    took = time.monotonic() - began
    for reader in readers:
        assert reader._thread is not None
        reader._thread.join(5)
        assert not reader._thread.is_alive(), "the stream was not ended by the server"
        assert reader.status == 200
    return took


@pytest.mark.services
def test_make_runs_server_stops_at_once_with_streams_open(tmp_path: Path) -> None:
    """SIGTERM (a service manager's stop) with streams open: without ending them the
    worker waited its whole graceful timeout (30 s) for answers that never end."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_", "STREAM_"))}
    env.update(DATA_DIR=str(tmp_path / "data"))
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "auto-session"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)  # type: ignore[arg-type]
        made = subprocess.run(
            [str(BIN / "auto-session"), "clients", "create", "--name", "bot", "--role", "bot",
             "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
            check=True)
        auth = {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}
        took = _stops_with_streams_open(server, base, auth)  # type: ignore[arg-type]
        assert took < 15, f"stopping took {took:.1f} s (graceful timeout 30 s)"
    finally:
        if server.poll() is None:
            _stop(server)  # type: ignore[arg-type]


@pytest.mark.services
def test_the_procfiles_stream_process_stops_at_once_with_streams_open(  # type: ignore[no-untyped-def]
        runtime, backend) -> None:
    seed_event(runtime)
    port = free_port()
    env = {**backend.env(), "STREAM_PORT": str(port), "STREAM_KEEPALIVE_INTERVAL": "30"}
    server = subprocess.Popen(
        [str(BIN / "gunicorn"), "--config", "gunicorn_stream.conf.py", "--graceful-timeout",
         "60", "--bind", f"127.0.0.1:{port}", "--no-control-socket", "app.stream_wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(f"http://127.0.0.1:{port}", server)
        auth = {"Authorization":
                f"Bearer {ClientService(runtime.database).create(name='s', role='bot').token}"}
        took = _stops_with_streams_open(server, f"http://127.0.0.1:{port}", auth)
        assert took < 30, f"stopping took {took:.1f} s (graceful timeout 60 s here)"
    finally:
        if server.poll() is None:
            _stop(server)
