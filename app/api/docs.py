"""`/openapi.json` and `/docs`: the generated document, and Swagger UI to browse it.

Swagger UI comes from the `swagger-ui-bundle` package (its files served from
`/docs/assets/`, no CDN). "Try it out" sends the bearer token given under
"Authorize" (the document's `bearer` security scheme), kept in the browser's local
storage across reloads (`persistAuthorization`). The page's only script of our own
is a static file, and the validator badge (which would call swagger.io) is off.

The bundled Swagger UI (4.15) reads OpenAPI 3.0, not the 3.1 of `/openapi.json`, so
the page reads `/docs/openapi-3.0.json`: the same document with 3.1's nullable form
(`anyOf: [X, {"type": "null"}]`) written the 3.0 way (`nullable: true`).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from app.api.http import respond
from app.api.openapi import build_document
from app.errors import NotFound

bp = Blueprint("docs", __name__)
DOC_KEY = "auto_session.openapi"
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png",
                    "favicon-16x16.png"})
ASSET_MAX_AGE = 86400

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Auto Session API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png" sizes="32x32">
</head><body>
<div id="swagger-ui" data-url="/docs/openapi-3.0.json"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>
"""

INIT_JS = """window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-url"),
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    displayRequestDuration: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""


def _document() -> dict[str, Any]:
    document = current_app.extensions.get(DOC_KEY)
    if document is None:
        document = build_document(current_app)
        current_app.extensions[DOC_KEY] = document
    return document


@bp.get("/openapi.json")
def openapi_json() -> Response:
    return respond(_document())


@bp.get("/docs/openapi-3.0.json")
def openapi_30_json() -> Response:
    return respond(as_openapi_30(_document()))


@bp.get("/docs")
def docs_page() -> Response:
    return Response(DOCS_HTML, mimetype="text/html")


@bp.get("/docs/init.js")
def docs_script() -> Response:
    return Response(INIT_JS, mimetype="text/javascript")


@bp.get("/docs/assets/<name>")
def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no docs asset {name}")
    return send_from_directory(str(swagger_ui_path), name, max_age=ASSET_MAX_AGE)


def as_openapi_30(document: dict[str, Any]) -> dict[str, Any]:
    """The document as OpenAPI 3.0.3 (for Swagger UI 4): nullable unions rewritten."""
    converted = _nullable_30(document)
    converted["openapi"] = "3.0.3"
    return converted


def _nullable_30(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable_30(value) for key, value in node.items()}
    options = out.get("anyOf")
    if isinstance(options, list) and {"type": "null"} in options:
        rest = [o for o in options if o != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        else:  # a reference takes no siblings in 3.0: wrap it
            out["anyOf" if len(rest) > 1 else "allOf"] = rest
        out["nullable"] = True
    return out
