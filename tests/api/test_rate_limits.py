"""Rate limits (SPEC §8): a request budget per client by role, failed authentications
per address; past a limit a 429 `/problems/rate-limited` problem with `Retry-After`.
Counters live in Redis on the mysql backend (shared by every app and process), in the
process on the embedded SQLite default."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from limits.storage import MemoryStorage

from app.api.ratelimit import LIMITS_KEY
from app.clients.service import ClientService
from app.config import ConfigError, Settings, load_settings
from app.factory import create_app
from app.runtime import Runtime, build_runtime
from tests.api.conftest import Caller

ROOT = Path(__file__).resolve().parents[2]
SMALL_LIMITS = {
    "rate_limit_bot": "5/minute",
    "rate_limit_desk": "3/minute",
    "rate_limit_admin": "2/minute",
    "rate_limit_auth_failures": "3/minute",
}
OPEN_PATHS = ("/healthz", "/readyz", "/openapi.json", "/docs", "/admin/static/console.js")


@pytest.fixture
def settings(backend: Any, tmp_path: Path) -> Settings:
    """Small limits (a minute long, so a slow machine stays inside one window)."""
    return backend.settings(tmp_path, **SMALL_LIMITS)


@pytest.fixture
def other_runtime(backend: Any, tmp_path: Path, runtime: Runtime) -> Iterator[Any]:
    """Build more runtimes on the test's database (its own pools and Redis client)."""
    built: list[Runtime] = []

    def build(**overrides: Any) -> Runtime:
        rt = build_runtime(backend.settings(tmp_path, **{**SMALL_LIMITS, **overrides}))
        rt._schema_checked = True
        built.append(rt)
        return rt

    yield build
    for rt in built:
        rt.close()


def codes(caller: Caller, count: int, path: str = "/api/v1/sessions") -> list[int]:
    return [caller.get(path).status_code for _ in range(count)]


def assert_rate_limited(response: Any, setting: str, limit: str) -> None:
    assert response.status_code == 429
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["type"] == "/problems/rate-limited"
    assert setting in body["detail"] and limit in body["detail"]
    assert (body["setting"], body["limit"]) == (setting, limit)
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60 and body["retry_after"] == retry_after


# ---- budgets per client, by role ---------------------------------------------------------------
def test_the_request_past_the_bot_budget_is_429_with_retry_after(bot: Caller):
    assert codes(bot, 5) == [200] * 5
    assert_rate_limited(bot.get("/api/v1/sessions"), "RATE_LIMIT_BOT", "5/minute")
    assert bot.post("/api/v1/sessions", {"account_id": "a", "shop_id": "s",
                                         "session_type": "AUTO_BARGAIN"}).status_code == 429


def test_another_client_is_still_served(bot: Caller, other_bot: Caller):
    assert codes(bot, 6)[-1] == 429
    assert codes(other_bot, 5) == [200] * 5


def test_each_role_has_its_own_budget(desk: Caller, admin: Caller):
    assert codes(desk, 4, "/api/v1/transfers") == [200] * 3 + [429]
    assert_rate_limited(desk.get("/api/v1/transfers"), "RATE_LIMIT_DESK", "3/minute")
    assert codes(admin, 3, "/admin/api/stats") == [200] * 2 + [429]
    assert_rate_limited(admin.get("/api/v1/sessions"), "RATE_LIMIT_ADMIN", "2/minute")


def test_the_budget_comes_back_when_the_window_ends(runtime: Runtime, other_runtime):
    app = create_app(other_runtime(rate_limit_bot="2/second"), TESTING=True)
    token = ClientService(runtime.database).create(name="fast-bot", role="bot").token
    bot = Caller(app.test_client(), "", token, "bot")
    assert codes(bot, 3) == [200, 200, 429]
    time.sleep(int(bot.get("/api/v1/sessions").headers["Retry-After"]) + 0.2)
    assert codes(bot, 1) == [200]


def test_open_endpoints_are_never_counted(http: FlaskClient, bot: Caller):
    for path in OPEN_PATHS:
        for _ in range(8):
            response = http.get(path, headers=bot.headers())
            assert response.status_code == 200, path
            assert "Retry-After" not in response.headers
    assert codes(bot, 5) == [200] * 5


def test_rate_limiting_can_be_turned_off(runtime: Runtime, other_runtime):
    app = create_app(other_runtime(rate_limit_enabled=False), TESTING=True)
    token = ClientService(runtime.database).create(name="unlimited", role="bot").token
    bot = Caller(app.test_client(), "", token, "bot")
    assert codes(bot, 12) == [200] * 12
    anonymous = app.test_client()
    assert [anonymous.get("/api/v1/sessions").status_code for _ in range(6)] == [401] * 6


# ---- failed authentications, per address -----------------------------------------------------
def test_failed_authentications_are_limited_per_address(http: FlaskClient, bot: Caller,
                                                         runtime: Runtime):
    revoked = ClientService(runtime.database).create(name="gone", role="bot")
    ClientService(runtime.database).revoke(revoked.client_id)
    attempts = [{}, {"Authorization": "Bearer ast_unknown"},
                {"Authorization": f"Bearer {revoked.token}"}]
    assert [http.get("/api/v1/sessions", headers=h).status_code for h in attempts] == [401] * 3
    for headers in attempts:
        assert_rate_limited(http.get("/api/v1/sessions", headers=headers),
                            "RATE_LIMIT_AUTH_FAILURES", "3/minute")
    assert "127.0.0.1" in http.get("/api/v1/sessions").get_json()["detail"]
    # a valid token from the same address still passes (and spends its own budget only)
    assert bot.get("/api/v1/sessions").status_code == 200
    # another address has its own count
    elsewhere = http.get("/api/v1/sessions", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    assert elsewhere.status_code == 401
    assert http.get("/admin/api/stats").status_code == 429  # the admin API's door too


def test_behind_trusted_proxies_the_forwarded_address_is_the_client(
        runtime: Runtime, other_runtime: Any) -> None:
    """PROXY_HOPS=1: each forwarded client address has its own count; without it a
    forged X-Forwarded-For changes nothing (every try counts against the peer)."""
    trusting = create_app(other_runtime(proxy_hops=1), TESTING=True).test_client()
    for _ in range(3):
        trusting.get("/api/v1/sessions", headers={"X-Forwarded-For": "198.51.100.1"})
    refused = trusting.get("/api/v1/sessions", headers={"X-Forwarded-For": "198.51.100.1"})
    assert refused.status_code == 429 and "198.51.100.1" in refused.get_json()["detail"]
    other = trusting.get("/api/v1/sessions", headers={"X-Forwarded-For": "198.51.100.2"})
    assert other.status_code == 401

    direct = create_app(other_runtime(), TESTING=True).test_client()
    forged = [direct.get("/api/v1/sessions", environ_base={"REMOTE_ADDR": "192.0.2.9"},
                         headers={"X-Forwarded-For": f"203.0.113.{n}"}).status_code
              for n in range(4)]
    assert forged == [401, 401, 401, 429]


def test_a_refused_token_does_not_spend_a_client_budget(http: FlaskClient, bot: Caller):
    for _ in range(3):
        http.get("/api/v1/sessions", headers={"Authorization": "Bearer ast_nope"})
    assert codes(bot, 5) == [200] * 5


# ---- where the counters live ------------------------------------------------------------------
@pytest.mark.sqlite_only
def test_embedded_counters_live_in_the_process(app: Flask, bot: Caller, runtime: Runtime):
    assert runtime.redis is None
    bot.get("/api/v1/sessions")
    assert isinstance(app.extensions[LIMITS_KEY].storage, MemoryStorage)


@pytest.mark.services
def test_counters_live_in_redis_under_the_key_prefix(bot: Caller, runtime: Runtime,
                                                     http: FlaskClient):
    assert runtime.redis is not None
    bot.get("/api/v1/sessions")
    http.get("/api/v1/sessions")
    prefix = f"{runtime.settings.redis_key_prefix}:ratelimit:"
    keys = sorted(k.decode() for k in runtime.redis.scan_iter(match=f"{prefix}*"))
    assert any(bot.client_id in k for k in keys), keys
    assert any("auth-failures" in k and "127.0.0.1" in k for k in keys), keys
    for key in keys:
        assert 0 < runtime.redis.ttl(key) <= 60


@pytest.mark.services
def test_two_app_instances_share_one_budget(runtime: Runtime, other_runtime, bot: Caller):
    first = Caller(create_app(other_runtime(), TESTING=True).test_client(), "", bot.token, "bot")
    second = Caller(create_app(other_runtime(), TESTING=True).test_client(), "", bot.token,
                    "bot")
    assert codes(first, 3) + codes(second, 2) == [200] * 5
    assert first.get("/api/v1/sessions").status_code == 429
    assert second.get("/api/v1/sessions").status_code == 429


def test_a_large_budget_is_taken_in_leases_and_still_exact_in_one_process(
        runtime: Runtime, other_runtime):
    """200 a minute: leases of 10 (1/LEASE_SHARE), so the counter store is asked once
    every ten requests, and the 201st request is still the first refused."""
    rt = other_runtime(rate_limit_bot="200/minute")
    app = create_app(rt, TESTING=True)
    token = ClientService(runtime.database).create(name="leasing-bot", role="bot").token
    bot = Caller(app.test_client(), "", token, "bot")
    bot.get("/api/v1/sessions")
    limits = app.extensions[LIMITS_KEY]
    hits: list[int] = []
    spend = limits.counter.hit

    def counted(item: Any, *identifiers: str, cost: int = 1) -> bool:
        hits.append(cost)
        return spend(item, *identifiers, cost=cost)

    limits.counter.hit = counted
    assert codes(bot, 199) == [200] * 199
    assert_rate_limited(bot.get("/api/v1/sessions"), "RATE_LIMIT_BOT", "200/minute")
    assert hits[:-1] == [10] * 19 and len(hits) == 20  # one ask per lease, then refused


@pytest.mark.services
def test_leases_of_several_processes_share_one_budget_in_redis(
        runtime: Runtime, other_runtime, bot: Caller):
    apps = [create_app(other_runtime(rate_limit_bot="300/minute"), TESTING=True)
            for _ in range(2)]
    first, second = (Caller(a.test_client(), "", bot.token, "bot") for a in apps)
    # leases of 15 (1/LEASE_SHARE): ten for the first, nine for the second, all spent
    assert codes(first, 150) + codes(second, 135) == [200] * 285
    # what is left (15) is one lease: the first takes it and spends it; then both are
    # refused — never more than the budget
    answers = codes(first, 16) + codes(second, 2)
    assert answers.count(200) <= 15 and answers[-2:] == [429, 429]
    key = next(k for k in runtime.redis.scan_iter(  # type: ignore[union-attr]
        match=f"{runtime.settings.redis_key_prefix}:ratelimit:*{bot.client_id}*"))
    assert int(runtime.redis.get(key)) >= 300  # type: ignore[union-attr, arg-type]


@pytest.mark.services
def test_another_process_spends_the_same_budget(backend: Any, bot: Caller):
    script = (
        "import json, sys\n"
        "from app.factory import create_app\n"
        "http = create_app().test_client()\n"
        "auth = {'Authorization': 'Bearer ' + sys.argv[1]}\n"
        "print(json.dumps([http.get('/api/v1/sessions', headers=auth).status_code "
        "for _ in range(4)]))\n"
    )
    env = {**backend.env(), **{k.upper(): v for k, v in SMALL_LIMITS.items()}}
    done = subprocess.run([sys.executable, "-c", script, bot.token], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [200] * 4
    assert codes(bot, 2) == [200, 429]


def test_a_redis_outage_fails_open(runtime: Runtime, other_runtime, bot: Caller,
                                   caplog: pytest.LogCaptureFixture):
    """Requests that need no Redis are still served, uncounted; none turns into a 500."""
    down = other_runtime(redis_url="redis://127.0.0.1:1/0")
    http = create_app(down, TESTING=True).test_client()
    with caplog.at_level(logging.WARNING, logger="app.api.ratelimit"):
        started = time.monotonic()
        statuses = [http.get("/api/v1/sessions", headers=bot.headers()).status_code
                    for _ in range(8)]
        statuses.append(http.get("/api/v1/sessions").status_code)
    assert statuses == [200] * 8 + [401]
    assert time.monotonic() - started < 10
    assert "rate limit counters unreachable" in caplog.text


def test_a_bad_limit_stops_start_up_naming_the_variable():
    for name, value in (("rate_limit_desk", "lots"), ("rate_limit_bot", "0/second"),
                        ("rate_limit_auth_failures", "1/second;5/minute")):
        with pytest.raises(ConfigError, match=name.upper()):
            load_settings(_env_file=None, **{name: value})
    assert load_settings(_env_file=None, rate_limit_admin="10 per 2 seconds")
