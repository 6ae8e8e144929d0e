"""SPEC §6 webhook policy at delivery, against real HTTP servers on 127.0.0.1: the address
is checked again at every attempt (and is the one connected to), redirects are not
followed, and one attempt has one deadline, whatever the receiver does."""

from __future__ import annotations

import threading
import time

import pytest

from app.delivery import urlpolicy
from app.delivery.service import delivery_log
from app.runtime import build_runtime, set_runtime
from tests.delivery.receiver import HostileReceiver, WebhookReceiver
from tests.delivery.test_webhooks import create, drain, make_client, subscribe

SLACK = 2.0  # seconds allowed past WEBHOOK_TIMEOUT: generous, this is a bound, not a benchmark


@pytest.fixture
def make_runtime(backend, tmp_path, runtime, allow_private):
    """A runtime with these webhook settings (and this test's WEBHOOK_ALLOW_PRIVATE)."""
    built = []

    def make(**overrides):
        values = {"webhook_allow_private": allow_private, "webhook_retry_base": 0.2,
                  "webhook_max_attempts": 1, "webhook_timeout": 2.0, **overrides}
        rt = build_runtime(backend.settings(tmp_path, **values))
        rt._schema_checked = True
        set_runtime(rt)
        built.append(rt)
        return rt

    yield make
    set_runtime(runtime)
    for rt in built:
        rt.close()


def only_delivery(rt):
    with rt.database.read() as db:
        entries = delivery_log(db)
    assert len(entries) <= 1, entries
    return entries[0] if entries else None


def given_up(rt):
    entry = only_delivery(rt)
    return entry is not None and entry["status"] == "failed"


# ---- the address, again at delivery ----------------------------------------------------
@pytest.mark.parametrize("allow_private", [False])
@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "0x7f000001", "127.1",
                                  "localhost", "[::ffff:127.0.0.1]"])
def test_a_url_forbidden_at_delivery_fails_every_attempt_and_sends_nothing(make_runtime, host):
    """E.g. a URL registered while WEBHOOK_ALLOW_PRIVATE was on, or written around the API."""
    rt = make_runtime(webhook_max_attempts=3)
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as receiver:
        port = receiver.port
        subscribe(rt, "bot-a", f"http://{host}:{port}/hooks/auto-session", allow_private=True)
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt))
        assert receiver.attempts == {}
    entry = only_delivery(rt)
    assert entry["attempts"] == 3
    for attempt in entry["attempt_log"]:
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("refused by the webhook URL policy: host")
    assert "127.0.0.1" in entry["last_error"] or "::1" in entry["last_error"]


@pytest.mark.parametrize("allow_private", [False])
def test_a_name_that_re_resolves_to_loopback_is_refused_at_delivery(make_runtime, monkeypatch):
    """DNS rebinding: the name was public when it was registered."""
    rt = make_runtime()
    make_client(rt, "bot-a", "bot")
    answers = {"hooks.example.com": ["93.184.216.34"]}
    monkeypatch.setattr(urlpolicy, "lookup_addresses", lambda host, port: answers[host])
    with WebhookReceiver() as receiver:
        port = receiver.port
        subscribe(rt, "bot-a", f"http://hooks.example.com:{port}/hooks/auto-session")
        answers["hooks.example.com"] = ["127.0.0.1"]
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt))
        assert receiver.attempts == {}
    assert only_delivery(rt)["last_error"] == (
        "refused by the webhook URL policy: host hooks.example.com resolves to 127.0.0.1, "
        "a loopback address")


def test_delivery_connects_to_the_address_it_resolved_and_checked(make_runtime, monkeypatch):
    """The name is resolved once per attempt, by the policy, and the connection goes to
    that address: no second lookup a rebinding resolver could answer differently. The
    name exists only in this stand-in resolver, so the POST can reach the receiver only
    through it; the Host header is still the URL's."""
    rt = make_runtime()
    make_client(rt, "bot-a", "bot")
    lookups = []

    def resolver(host, port):
        lookups.append(host)
        return ["127.0.0.1"]

    monkeypatch.setattr(urlpolicy, "lookup_addresses", resolver)
    with WebhookReceiver() as receiver:
        port = receiver.port
        subscribe(rt, "bot-a", f"http://hooks.example.test:{port}/hooks/auto-session")
        create(rt, "bot-a")
        drain(rt, lambda: len(receiver.received) == 1)
        (got,) = receiver.received
    assert got["headers"]["host"] == f"hooks.example.test:{port}"
    assert lookups == ["hooks.example.test"]


@pytest.mark.parametrize("allow_private", [False])
def test_a_name_that_does_not_resolve_at_delivery_is_a_failed_attempt(make_runtime, monkeypatch):
    rt = make_runtime()
    make_client(rt, "bot-a", "bot")

    def nowhere(host, port):
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(urlpolicy, "lookup_addresses", nowhere)
    subscribe(rt, "bot-a", "https://gone.example.com/hook")  # accepted: it may exist later
    create(rt, "bot-a")
    drain(rt, lambda: given_up(rt))
    assert only_delivery(rt)["last_error"] == (
        "ResolutionFailed: gone.example.com does not resolve (Name or service not known)")


# ---- redirects -------------------------------------------------------------------------
def test_a_redirect_is_not_followed(make_runtime):
    rt = make_runtime()
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver() as target, WebhookReceiver() as redirector:
        redirector.redirect_to = target.url
        subscribe(rt, "bot-a", redirector.url)
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt))
        assert sum(redirector.attempts.values()) == 1
        assert target.attempts == {} and target.received == []
    (attempt,) = only_delivery(rt)["attempt_log"]
    assert attempt["status_code"] == 302
    assert attempt["error"].startswith("HTTP 302 (redirects are not followed)")


# ---- one deadline per attempt ----------------------------------------------------------
@pytest.mark.parametrize("mode", ["drip_status", "drip_body"])
def test_a_dripping_receiver_is_cut_off_at_the_webhook_timeout(make_runtime, mode):
    """A byte every 0.4 s never trips a per-read timeout of 1.5 s; the 60-byte answer
    would take 24 s. The attempt ends at WEBHOOK_TIMEOUT all the same."""
    timeout = 1.5
    rt = make_runtime(webhook_timeout=timeout)
    make_client(rt, "bot-a", "bot")
    with HostileReceiver(mode, interval=0.4, drip_bytes=60) as receiver:
        subscribe(rt, "bot-a", receiver.url)
        started = time.monotonic()
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt), timeout=timeout + 10)
        elapsed = time.monotonic() - started
        assert receiver.requests == 1 and 0 < receiver.sent < 60  # it did drip, for a while
    (attempt,) = only_delivery(rt)["attempt_log"]
    assert attempt["duration_ms"] <= (timeout + SLACK) * 1000
    assert attempt["duration_ms"] >= (timeout - 0.5) * 1000  # cut by the deadline, not earlier
    assert "within 1.5 s (WEBHOOK_TIMEOUT)" in attempt["error"]
    assert elapsed < timeout + 2 * SLACK


def test_an_endless_answer_is_not_read_to_its_end(make_runtime):
    rt = make_runtime(webhook_timeout=10.0)
    make_client(rt, "bot-a", "bot")
    with HostileReceiver("endless") as receiver:
        subscribe(rt, "bot-a", receiver.url)
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt))
        deadline = time.monotonic() + 5
        while receiver.sent == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < receiver.sent < receiver.endless_bytes // 4  # hung up early
    (attempt,) = only_delivery(rt)["attempt_log"]
    assert attempt["status_code"] == 500
    assert attempt["error"] == "HTTP 500: " + "x" * 300
    assert attempt["duration_ms"] < 5000


def test_a_resolver_that_hangs_is_cut_off_at_the_webhook_timeout(make_runtime, monkeypatch):
    rt = make_runtime(webhook_timeout=1.0)
    make_client(rt, "bot-a", "bot")
    release = threading.Event()
    monkeypatch.setattr(urlpolicy, "lookup_addresses",
                        lambda host, port: release.wait(30) and ["127.0.0.1"])
    try:
        subscribe(rt, "bot-a", "http://slow-dns.example.test:9/hook")
        create(rt, "bot-a")
        drain(rt, lambda: given_up(rt))
    finally:
        release.set()
    (attempt,) = only_delivery(rt)["attempt_log"]
    assert attempt["error"].startswith("ResolutionFailed: resolving slow-dns.example.test")
    assert attempt["duration_ms"] <= (1.0 + SLACK) * 1000


# ---- https to the checked address ------------------------------------------------------
@pytest.mark.parametrize(("certified", "delivered"), [("hooks.example.test", True),
                                                      ("someone-else.example.test", False)])
def test_https_goes_to_the_checked_address_and_verifies_the_certificate_for_the_name(
    make_runtime, monkeypatch, certified, delivered
):
    """The connection is pinned to the resolved IP, yet TLS is still negotiated (SNI)
    and verified for the URL's host name, not for the address."""
    pytest.importorskip("cryptography")
    from app.delivery import transport
    from tests.delivery.receiver import tls_contexts

    server_tls, client_tls = tls_contexts(certified)
    monkeypatch.setattr(transport, "_ssl_context", lambda: client_tls)
    monkeypatch.setattr(urlpolicy, "lookup_addresses", lambda host, port: ["127.0.0.1"])
    rt = make_runtime()
    make_client(rt, "bot-a", "bot")
    with WebhookReceiver(tls=server_tls) as receiver:
        subscribe(rt, "bot-a", f"https://hooks.example.test:{receiver.port}/hooks/auto-session")
        create(rt, "bot-a")
        if delivered:
            drain(rt, lambda: len(receiver.received) == 1)
            assert receiver.received[0]["headers"]["host"] == f"hooks.example.test:{receiver.port}"
        else:
            drain(rt, lambda: given_up(rt))
            assert receiver.received == []
    if not delivered:
        error = only_delivery(rt)["last_error"]
        assert error.startswith("ConnectError") and "certificate verify failed" in error
