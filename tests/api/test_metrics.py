"""`GET /metrics` in one process (the embedded default's registry): who may read it,
what the request counters and the scrape-time gauges say, and the trace id of every
answer. Across real gunicorn and Celery processes: tests/api/test_observability_processes.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from app.factory import create_app
from app.runtime import Runtime
from tests.api.conftest import Caller

TOKEN = "metrics-token-0123456789abcdef"
OUTSIDE = {"REMOTE_ADDR": "203.0.113.7"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(http: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = http.get("/metrics")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain")
    return samples(response.get_data(as_text=True))


def requests_of(found: dict[Any, float], method: str, route: str, status: str) -> float:
    key = ("autosession_http_requests_total",
           (("method", method), ("route", route), ("status", status)))
    return found.get(key, 0.0)


@pytest.fixture
def configured(runtime: Runtime) -> Iterator[Any]:
    """Build an app on the test runtime with some settings changed."""
    original = runtime.settings

    def make(**changes: Any) -> FlaskClient:
        runtime.settings = original.model_copy(update=changes)
        return create_app(runtime, TESTING=True).test_client()

    yield make
    runtime.settings = original


def test_request_counts_and_durations_are_labelled_by_url_rule(http: FlaskClient, bot: Caller):
    before = scrape(http)
    created = [bot.create("AUTO_BARGAIN", shop=f"shop-{i}") for i in range(3)]
    for session in created:
        assert bot.get(f"/api/v1/sessions/{session['session_id']}").status_code == 200
    assert bot.get("/api/v1/sessions/no-such-session").status_code == 404
    assert http.get("/api/v1/nothing-here/at-all").status_code == 404
    after = scrape(http)

    route = "/api/v1/sessions/<session_id>"
    assert requests_of(after, "POST", "/api/v1/sessions", "201") - requests_of(
        before, "POST", "/api/v1/sessions", "201") == 3
    assert requests_of(after, "GET", route, "200") - requests_of(before, "GET", route, "200") == 3
    assert requests_of(after, "GET", route, "404") - requests_of(before, "GET", route, "404") == 1
    assert requests_of(after, "GET", "unmatched", "404") - requests_of(
        before, "GET", "unmatched", "404") == 1
    count = ("autosession_http_request_duration_seconds_count",
             (("method", "GET"), ("route", route)))
    assert after[count] - before.get(count, 0.0) == 4
    assert not any(s["session_id"] in str(key) for key in after for s in created)


def test_state_gauges_are_read_at_scrape_time(http: FlaskClient, bot: Caller):
    bot.create("AUTO_BARGAIN", shop="s1")
    bot.create("AUTO_FOLLOW_UP", shop="s1")  # waits behind the first
    robot = bot.create("AUTO_BARGAIN", shop="s2")
    assert bot.post(f"/api/v1/sessions/{robot['session_id']}/transfer",
                    {"reason": "asks for a person"}).status_code in (200, 201)
    found = scrape(http)
    assert found[("autosession_sessions", (("status", "ACTIVE"),))] == 1
    assert found[("autosession_sessions", (("status", "PENDING"),))] == 1
    assert found[("autosession_sessions", (("status", "TRANSFERRED"),))] == 1
    assert found[("autosession_transfers_waiting", ())] == 1
    assert 0 <= found[("autosession_transfer_oldest_wait_seconds", ())] < 60
    assert found[("autosession_metrics_database_up", ())] == 1


def test_loopback_is_open_and_elsewhere_needs_the_token(configured: Any):
    no_token = configured()
    assert no_token.get("/metrics").status_code == 200
    hidden = no_token.get("/metrics", environ_base=OUTSIDE)
    assert hidden.status_code == 404 and hidden.mimetype == "application/problem+json"

    with_token = configured(metrics_token=TOKEN)
    assert with_token.get("/metrics").status_code == 200
    missing = with_token.get("/metrics", environ_base=OUTSIDE)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = with_token.get("/metrics", environ_base=OUTSIDE,
                           headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401
    right = with_token.get("/metrics", environ_base=OUTSIDE,
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and b"autosession_http_requests_total" in right.data


def test_a_forwarded_request_is_judged_by_the_client_the_trusted_proxy_saw(configured: Any):
    forwarded = {"X-Forwarded-For": "198.51.100.4"}
    # No trusted proxy: a loopback peer relaying someone is not "loopback".
    untrusted = configured(metrics_token=TOKEN)
    assert untrusted.get("/metrics", headers=forwarded).status_code == 401
    # One trusted proxy on loopback: the client it names decides.
    behind_proxy = configured(metrics_token=TOKEN, proxy_hops=1)
    assert behind_proxy.get("/metrics", headers=forwarded).status_code == 401
    assert behind_proxy.get("/metrics", headers={
        **forwarded, "Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert behind_proxy.get("/metrics",
                            headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200


def test_metrics_can_be_switched_off(configured: Any):
    off = configured(metrics_enabled=False, metrics_token=TOKEN)
    assert off.get("/metrics").status_code == 404
    assert off.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404


def test_rate_limit_refusals_are_counted(configured: Any, runtime: Runtime):
    limited = configured(rate_limit_auth_failures="2/minute")
    before = samples(limited.get("/metrics").get_data(as_text=True))
    answers = [limited.get("/api/v1/sessions", environ_base={"REMOTE_ADDR": "192.0.2.9"})
               .status_code for _ in range(4)]
    assert answers == [401, 401, 429, 429]
    after = samples(limited.get("/metrics").get_data(as_text=True))
    key = ("autosession_rate_limited_total", (("limit", "RATE_LIMIT_AUTH_FAILURES"),))
    assert after[key] - before.get(key, 0.0) == 2


def test_every_answer_has_a_trace_id_and_every_problem_carries_it(http: FlaskClient,
                                                                   bot: Caller):
    ok = bot.get("/api/v1/sessions")
    problems = [
        http.get("/api/v1/sessions"),  # 401
        bot.get("/api/v1/sessions/nope"),  # 404
        bot.post("/api/v1/sessions", {"account_id": ""}),  # 422
        http.delete("/api/v1/sessions"),  # 405
    ]
    ids = {ok.headers["X-Trace-Id"]}
    for answer in problems:
        assert answer.mimetype == "application/problem+json"
        trace_id = answer.get_json()["trace_id"]
        assert trace_id == answer.headers["X-Trace-Id"]
        assert len(trace_id) == 16 and int(trace_id, 16) >= 0
        ids.add(trace_id)
    assert len(ids) == 5  # one per request


def test_an_incoming_trace_header_is_not_trusted(bot: Caller):
    answer = bot.http.get("/api/v1/sessions/nope", headers=bot.headers(
        {"X-Trace-Id": "forged", "X-Request-ID": "forged", "traceparent": "forged"}))
    assert answer.get_json()["trace_id"] != "forged"


def test_metrics_app_fixture_is_the_embedded_registry(app: Flask):
    # no multiprocess folder in the test process: the process's own registry is served
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert "python_gc_objects_collected_total" in text


@pytest.mark.sqlite_only  # the embedded default: the pipeline runs in a thread of the web
def test_an_embedded_upload_keeps_the_requests_trace_id_in_its_pipeline(admin: Caller):
    from celery.signals import task_prerun

    from app.observability import context
    from tasks.imports import wait_eager

    seen: list[tuple[str, str | None]] = []

    def record(task: Any = None, **_kwargs: Any) -> None:
        seen.append((task.name, context.current().get("trace_id")))

    task_prerun.connect(record, weak=False)
    try:
        upload = admin.http.post(
            "/api/v1/imports", headers=admin.headers({"Content-Type": "text/csv"}),
            data=b"message_id,account_id,shop_id,sender_role,content,sent_at\n"
                 b"t1,acc-t,shop-t,robot,hi,2024-01-01T00:00:00Z\n")
        assert upload.status_code == 202, upload.get_json()
        wait_eager(upload.get_json()["job_id"], 30)
    finally:
        task_prerun.disconnect(record)
    assert {name for name, _ in seen} >= {"imports.prepare", "imports.chunk"}
    assert {trace for _, trace in seen} == {upload.headers["X-Trace-Id"]}
