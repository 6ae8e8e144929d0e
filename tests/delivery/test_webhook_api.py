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
