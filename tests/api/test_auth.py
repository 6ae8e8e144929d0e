"""Bearer tokens, roles and ownership (SPEC §8): 401 vs 403 vs 404."""

from __future__ import annotations

import json

from click.testing import CliRunner
from sqlalchemy import select

from app.cli import main
from app.clients.models import ApiClient
from app.clients.service import ClientService, hash_token


def test_no_token_is_401_problem(http):
    response = http.get("/api/v1/sessions")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.get_json()["type"] == "/problems/unauthorized"


def test_unknown_and_malformed_tokens_are_401(http, bot):
    for header in ("Bearer nope", "Basic abc", "Bearer ", bot.token):
        response = http.get("/api/v1/sessions", headers={"Authorization": header})
        assert response.status_code == 401, header


def test_revoked_and_rotated_tokens_stop_working(runtime, http, bot):
    assert bot.get("/api/v1/sessions").status_code == 200
    service = ClientService(runtime.database)
    issued = service.rotate(bot.client_id)
    # a new app process has no cache: the old token is refused there at once
    from app.factory import create_app

    fresh = create_app(runtime).test_client()
    assert fresh.get("/api/v1/sessions",
                     headers={"Authorization": f"Bearer {bot.token}"}).status_code == 401
    assert fresh.get("/api/v1/sessions",
                     headers={"Authorization": f"Bearer {issued.token}"}).status_code == 200
    service.revoke(bot.client_id)
    fresh = create_app(runtime).test_client()
    assert fresh.get("/api/v1/sessions",
                     headers={"Authorization": f"Bearer {issued.token}"}).status_code == 401


def test_tokens_are_stored_only_as_sha256(runtime, bot):
    with runtime.database.read() as db:
        row = db.execute(select(ApiClient).where(ApiClient.client_id == bot.client_id)).scalar_one()
    assert row.token_hash == hash_token(bot.token)
    assert bot.token not in (row.token_hash, row.token_prefix)
    assert len(row.token_prefix) < len(bot.token) // 3


def test_wrong_role_is_403(bot):
    response = bot.get("/api/v1/transfers")
    assert response.status_code == 403
    assert response.get_json()["type"] == "/problems/forbidden"
    assert bot.put("/api/v1/agents/a1", {"presence": "online"}).status_code == 403


def test_bot_gets_404_for_another_clients_session(bot, other_bot):
    """404, not 403: a bot cannot learn that another client's session id exists."""
    session = other_bot.create("AUTO_BARGAIN")
    for response in (
        bot.get(f"/api/v1/sessions/{session['session_id']}"),
        bot.post(f"/api/v1/sessions/{session['session_id']}/pause"),
        bot.post(f"/api/v1/sessions/{session['session_id']}/heartbeat"),
        bot.post(f"/api/v1/sessions/{session['session_id']}/messages",
                 {"messages": [{"content": "hi", "sender_role": "robot"}]}),
    ):
        assert response.status_code == 404
        assert response.get_json()["detail"] == f"session {session['session_id']} not found"
    missing = bot.get("/api/v1/sessions/ses_doesnotexist")
    assert missing.get_json()["detail"] == "session ses_doesnotexist not found"
    assert bot.get("/api/v1/sessions").get_json()["items"] == []


def test_cli_creates_a_client_whose_token_works(runtime, http):
    result = CliRunner().invoke(main, ["clients", "create", "--name", "b1", "--role", "BOT",
                                       "--json"])
    assert result.exit_code == 0, result.output
    issued = json.loads(result.output)
    assert set(issued) == {"client_id", "token"}
    response = http.get("/api/v1/sessions", headers={"Authorization": f"Bearer {issued['token']}"})
    assert response.status_code == 200
    plain = CliRunner().invoke(main, ["clients", "create", "--name", "d1", "--role", "desk"])
    assert plain.exit_code == 0 and "token: ast_" in plain.output
    bad = CliRunner().invoke(main, ["clients", "create", "--name", "x", "--role", "root"])
    assert bad.exit_code != 0
