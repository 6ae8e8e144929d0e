"""End to end over real HTTP: gunicorn on MariaDB + Redis, a robot → human → robot story."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:  # type: ignore[type-arg]
    """Wait until `url` answers 200 (a server process starting), failing if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"the server died before {url} answered"
        assert time.monotonic() < deadline, f"{url} never answered"
        time.sleep(0.2)


def new_token(env: dict[str, str], role: str) -> str:
    out = subprocess.run([str(BIN / "auto-session"), "clients", "create", "--name", f"e2e-{role}",
                          "--role", role, "--json"], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)["token"]


@pytest.fixture
def server(runtime, backend):  # type: ignore[no-untyped-def]
    port = free_port()
    env = backend.env()
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", "2", "--threads", "4", "--bind", f"127.0.0.1:{port}",
         "--no-control-socket", "--graceful-timeout", "5", "app.wsgi:app"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "died")
            time.sleep(0.2)
        else:
            raise RuntimeError("gunicorn did not become ready")
        yield base, env
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def listening_sockets(port: int) -> int:
    """LISTEN sockets on `port` (any address) in this network namespace."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@pytest.mark.services
def test_each_worker_listens_on_its_own_socket_and_all_of_them_answer(server):
    """gunicorn.conf.py's `reuse_port`: one listening socket per worker (the kernel
    spreads connections over them), not one shared socket whose first-woken worker
    takes every pending connection; 16 keep-alive connections opened at once all work."""
    base, _env = server
    port = int(base.rsplit(":", 1)[1])
    assert listening_sockets(port) == 2  # the fixture's 2 workers
    clients = [httpx.Client(base_url=base, timeout=10) for _ in range(16)]
    try:
        for _round in range(3):
            assert all(c.get("/healthz").status_code == 200 for c in clients)
    finally:
        for c in clients:
            c.close()


@pytest.mark.services
def test_robot_human_robot_story_over_real_http(server):
    base, env = server
    bot = httpx.Client(base_url=base, timeout=10,
                       headers={"Authorization": f"Bearer {new_token(env, 'bot')}"})
    desk = httpx.Client(base_url=base, timeout=10,
                        headers={"Authorization": f"Bearer {new_token(env, 'desk')}"})
    with bot, desk:
        assert desk.put("/api/v1/agents/li", json={"presence": "online",
                                                   "skills": ["negotiation"]}).status_code == 201
        body = {"account_id": "acc", "shop_id": 7, "session_type": "AUTO_BARGAIN",
                "task_type": "negotiation"}
        created = bot.post("/api/v1/sessions", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert created.status_code == 201 and created.json()["status"] == "ACTIVE"
        sid = created.json()["session_id"]
        replay = bot.post("/api/v1/sessions", json=body, headers={"Idempotency-Key": "e2e-1"})
        assert replay.json()["session_id"] == sid
        talk = bot.post(f"/api/v1/sessions/{sid}/messages", json={"messages": [
            {"message_id": "e1", "sender_role": "counterpart", "content": "I want a refund"},
            {"message_id": "e2", "content": "Let me check"}]})
        assert talk.json()["accepted"] == 2

        # robot → human: the robot hands over, the routed agent accepts
        transfer = bot.post(f"/api/v1/sessions/{sid}/transfer",
                            json={"reason": "refund request", "urgency": 2}).json()
        assert transfer["offered_agent_id"] == "li"
        queue = desk.get("/api/v1/transfers").json()["items"]
        assert [t["transfer_id"] for t in queue] == [transfer["transfer_id"]]
        url = f"/api/v1/transfers/{transfer['transfer_id']}/accept"
        assert desk.post(url, json={"agent_id": "li"}).status_code == 200
        assert desk.post(url, json={"agent_id": "wang"}).status_code == 409
        assert bot.post(f"/api/v1/sessions/{sid}/messages",
                        json={"messages": [{"content": "me again"}]}).status_code == 409
        # one agent speaks: the desk names its agent, and only the assignee is heard
        assert desk.post(f"/api/v1/sessions/{sid}/messages",
                         json={"messages": [{"content": "refund done"}]}).status_code == 422
        assert desk.post(f"/api/v1/sessions/{sid}/messages", headers={"X-Agent-Id": "wang"},
                         json={"messages": [{"content": "me too"}]}).status_code == 409
        assert desk.post(f"/api/v1/sessions/{sid}/messages", json={
            "messages": [{"content": "refund done"}], "agent_id": "li"}).json()["accepted"] == 1
        assert desk.post(f"/api/v1/sessions/{sid}/complete").json()["status"] == "COMPLETED"

        # human → robot: the bot gets the slot again for a follow-up
        follow = bot.post("/api/v1/sessions", json={**body, "session_type": "AUTO_FOLLOW_UP",
                                                    "task_type": "follow_up"}).json()
        assert follow["status"] == "ACTIVE"
        events = bot.get("/api/v1/events", params={"limit": 100}).json()["items"]
        types = [e["type"] for e in events if e["session_id"] == sid]
        assert types[0] == "session.activated" and "session.transferred" in types
        assert "transfer.accepted" in types
        assert bot.get("/api/v1/sessions", params={"status": "completed"}).json()["items"][0][
            "session_id"] == sid


@pytest.mark.services
def test_robot_human_robot_story_with_a_hand_back_over_real_http(server):
    """SPEC §12: the desk hands the conversation back with what it learned; the bot
    finds `session.handed_back` in its feed and carries on in the session it names."""
    base, env = server
    bot = httpx.Client(base_url=base, timeout=10,
                       headers={"Authorization": f"Bearer {new_token(env, 'bot')}"})
    desk = httpx.Client(base_url=base, timeout=10,
                        headers={"Authorization": f"Bearer {new_token(env, 'desk')}"})
    with bot, desk:
        created = bot.post("/api/v1/sessions", json={
            "account_id": "acc", "shop_id": "hb-1", "session_type": "AUTO_BARGAIN",
            "task_type": "negotiation"}).json()
        sid = created["session_id"]
        transfer = bot.post(f"/api/v1/sessions/{sid}/transfer",
                            json={"reason": "asks for a discount code"}).json()
        assert desk.post(f"/api/v1/transfers/{transfer['transfer_id']}/accept",
                         json={"agent_id": "li"}).status_code == 200
        assert desk.post(f"/api/v1/sessions/{sid}/messages", headers={"X-Agent-Id": "li"},
                         json={"messages": [{"content": "code SAVE5 applies"}]}
                         ).status_code == 200
        handed = desk.post(f"/api/v1/sessions/{sid}/hand-back", headers={"X-Agent-Id": "li"},
                           json={"summary": "gave code SAVE5", "outcome": "needs_robot",
                                 "next_action": "close the deal", "context": {"code": "SAVE5"}})
        assert handed.status_code == 201, handed.text
        resumed = handed.json()["resumed"]
        assert resumed["status"] == "ACTIVE" and resumed["handed_back_from"] == sid
        events = bot.get("/api/v1/events", params={"limit": 100}).json()["items"]
        back = [e for e in events if e["type"] == "session.handed_back"]
        assert len(back) == 1 and back[0]["data"]["resumed_session_id"] == resumed["session_id"]
        assert back[0]["data"]["context"] == {"code": "SAVE5"}
        new_sid = back[0]["data"]["resumed_session_id"]
        assert bot.get(f"/api/v1/sessions/{new_sid}").json()["context"]["next_action"] == (
            "close the deal")
        assert bot.post(f"/api/v1/sessions/{new_sid}/messages", json={
            "messages": [{"content": "deal closed with SAVE5"}]}).json()["accepted"] == 1
        assert bot.post(f"/api/v1/sessions/{new_sid}/complete").json()["status"] == "COMPLETED"
