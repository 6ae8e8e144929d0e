"""`/api/v1/webhook`: register, read, rotate and remove a webhook through the HTTP API."""

from __future__ import annotations

import pytest

from tests.api.conftest import Caller


def test_register_read_rotate_and_remove(make_caller):
    bot: Caller = make_caller("bot")
    assert bot.get("/api/v1/webhook").get_json()["url"] is None
    put = bot.put("/api/v1/webhook", {"url": "http://127.0.0.1:9/hook"})
    assert put.status_code == 200, put.get_json()
    first = put.get_json()
    assert first["url"] == "http://127.0.0.1:9/hook" and first["secret"].startswith("whsec_")
    assert first["signature_header"] == "X-AutoSession-Signature"
    assert bot.get("/api/v1/webhook").get_json()["secret"] == first["secret"]
    same = bot.put("/api/v1/webhook", {"url": "https://example.invalid/h"}).get_json()
    assert same["secret"] == first["secret"]  # changing the URL keeps the secret
    rotated = bot.put("/api/v1/webhook", {"url": "https://example.invalid/h",
                                          "rotate_secret": True}).get_json()
    assert rotated["secret"] != first["secret"]
    gone = bot.http.delete("/api/v1/webhook", headers=bot.headers()).get_json()
    assert gone["url"] is None


@pytest.mark.parametrize("body", [{"url": "ftp://x/y"}, {"url": "not a url"}, {},
                                  {"url": "http://h/" + "a" * 1100}, {"url": 5}])
def test_bad_registration_is_a_422_naming_the_field(make_caller, body):
    response = make_caller("desk").put("/api/v1/webhook", body)
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"].startswith("url")


def test_webhook_needs_a_token(http):
    assert http.get("/api/v1/webhook").status_code == 401


# ---- the URL policy at registration (SPEC §6 webhook policy) ---------------------------
FORBIDDEN_URLS = [
    "http://127.0.0.1/h", "http://127.255.255.254:8080/h", "https://[::1]/h",
    "http://0.0.0.0/h", "http://[::]/h", "http://0/h",
    "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/h",
    "http://2130706433/h", "http://0x7f000001/h", "http://0177.0.0.1/h", "http://127.1/h",
    "http://10.0.0.1/h", "http://172.16.5.4/h", "http://192.168.1.1/h",
    "http://100.64.0.1/h", "http://[fc00::1]/h", "http://[fd12:3456::1]/h",
    "http://224.0.0.1/h", "http://[ff02::1]/h", "http://255.255.255.255/h",
    "http://240.0.0.1/h", "http://[::ffff:127.0.0.1]/h", "http://[::ffff:a9fe:a9fe]/h",
    "http://[::127.0.0.1]/h", "http://[64:ff9b::7f00:1]/h", "http://[2002:7f00:1::]/h",
    "http://localhost:8080/h", "http://LOCALHOST/h",
]


@pytest.mark.parametrize("allow_private", [False])
@pytest.mark.parametrize("url", FORBIDDEN_URLS)
def test_a_url_to_a_forbidden_address_is_refused_with_a_422_naming_url(make_caller, url):
    bot: Caller = make_caller("bot")
    response = bot.put("/api/v1/webhook", {"url": url})
    assert response.status_code == 422, response.get_json()
    problem = response.get_json()
    assert problem["type"] == "/problems/validation"
    (error,) = problem["errors"]
    assert error["field"] == "url"
    assert "address" in error["message"] and error["message"] in problem["detail"]
    assert bot.get("/api/v1/webhook").get_json()["url"] is None  # nothing was written


def test_the_same_urls_are_accepted_when_private_addresses_are_allowed(make_caller):
    bot: Caller = make_caller("bot")
    for url in FORBIDDEN_URLS:
        response = bot.put("/api/v1/webhook", {"url": url})
        assert response.status_code == 200, (url, response.get_json())


@pytest.mark.parametrize("allow_private", [False, True])
@pytest.mark.parametrize("url", ["http://user:pw@example.com/h", "https://token@example.com/h"])
def test_a_url_with_userinfo_is_refused_even_when_private_addresses_are_allowed(
    make_caller, url
):
    response = make_caller("desk").put("/api/v1/webhook", {"url": url})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["field"] == "url"
    assert "userinfo" in response.get_json()["errors"][0]["message"]


@pytest.mark.parametrize("allow_private", [False])
def test_a_public_address_is_accepted_under_the_default_policy(make_caller):
    bot: Caller = make_caller("bot")
    for url in ("https://93.184.216.34/h", "http://[2606:2800:220:1:248:1893:25c8:1946]/h",
                "http://[64:ff9b::5db8:d822]/h"):
        response = bot.put("/api/v1/webhook", {"url": url})
        assert response.status_code == 200, (url, response.get_json())
