"""Health, readiness, the OpenAPI document and /docs, and the error contract."""

from __future__ import annotations

import json
import logging
import re

from flask import Flask

from app.factory import create_app
from app.runtime import build_runtime


def test_healthz_and_readyz(http, runtime):
    assert http.get("/healthz").get_json() == {"status": "ok", "checks": {}}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.get_json()["checks"]["database"] == "ok"
    if runtime.redis is not None:
        assert ready.get_json()["checks"]["redis"] == "ok"


def test_readyz_is_503_when_the_database_or_redis_is_down(backend, tmp_path):
    down = build_runtime(backend.settings(
        tmp_path, database_url="mysql+pymysql://root@127.0.0.1:1/nothing",
        redis_url="redis://127.0.0.1:1/0"))
    try:
        response = create_app(down).test_client().get("/readyz")
    finally:
        down.close()
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["checks"] == {"database": "unavailable", "redis": "unavailable"}
    assert "127.0.0.1:1" not in response.get_data(as_text=True)


def test_openapi_document_covers_every_api_route(http, app: Flask):
    doc = http.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/"):
            path = rule.rule.replace("<", "{").replace(">", "}")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                assert (path, method.lower()) in documented
    create = doc["paths"]["/api/v1/sessions"]["post"]
    schema = create["requestBody"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/SessionRequest")
    assert {"201", "401", "403", "409", "422"} <= set(create["responses"])
    assert "SessionView" in doc["components"]["schemas"]
    assert create["security"] == [{"bearer": []}]


def test_docs_page_is_swagger_ui_served_by_the_app(http):
    """Swagger UI from the swagger-ui-bundle package, every asset from this server (no
    CDN), reading a 3.0 rendition of the document (Swagger UI 4 reads no 3.1)."""
    page = http.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert "https://" not in html and "http://" not in html
    local = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css",
            "/docs/init.js"} <= set(local)
    for url in local:
        asset = http.get(url)
        assert asset.status_code == 200, url
        assert len(asset.get_data()) > 100, url
    assert http.get("/docs/assets/swagger-ui-bundle.js").mimetype in {
        "text/javascript", "application/javascript"}
    assert http.get("/docs/assets/swagger-ui.css").mimetype == "text/css"
    script = http.get("/docs/init.js").get_data(as_text=True)
    assert "persistAuthorization: true" in script and "validatorUrl: null" in script
    assert "/docs/openapi-3.0.json" in html
    assert http.get("/docs/assets/index.html").status_code == 404  # only the listed files
    assert http.get("/docs/assets/..%2F__init__.py").status_code == 404


def test_docs_document_is_the_contract_in_openapi_30(http):
    full = http.get("/openapi.json").get_json()
    legacy = http.get("/docs/openapi-3.0.json").get_json()
    assert full["openapi"].startswith("3.1") and legacy["openapi"] == "3.0.3"
    assert set(legacy["paths"]) == set(full["paths"])
    assert legacy["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}}
    assert '{"type": "null"}' not in json.dumps(legacy)
    view = legacy["components"]["schemas"]["SessionView"]["properties"]
    assert view["ended_at"]["nullable"] is True and view["ended_at"]["type"] == "string"


def test_unknown_url_and_wrong_method_are_problems(http, bot):
    missing = http.get("/api/v1/nothing")
    assert missing.status_code == 404 and missing.mimetype == "application/problem+json"
    wrong = bot.http.delete("/api/v1/sessions", headers=bot.headers())
    assert wrong.status_code == 405 and "GET" in wrong.headers["Allow"]


def test_unexpected_errors_are_a_generic_500_without_internals(runtime, caplog):
    app = create_app(runtime)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("SELECT secret FROM api_clients -- password=hunter2")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/boom")
    assert response.status_code == 500
    text = response.get_data(as_text=True)
    assert "hunter2" not in text and "SELECT" not in text and "Traceback" not in text
    problem = response.get_json()
    assert problem["type"] == "/problems/internal" and problem["trace_id"]
    assert problem["trace_id"] in caplog.text and "hunter2" in caplog.text
