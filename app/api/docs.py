"""`/openapi.json` and `/docs`: the generated document and a self-contained page for it.

The page needs no CDN: a little inline script fetches `/openapi.json` and renders
every operation (grouped by tag) with its parameters, request body, responses and the
schemas they reference, expandable on click.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app

from app.api.http import respond
from app.api.openapi import build_document

bp = Blueprint("docs", __name__)
DOC_KEY = "auto_session.openapi"


@bp.get("/openapi.json")
def openapi_json() -> Response:
    document = current_app.extensions.get(DOC_KEY)
    if document is None:
        document = build_document(current_app)
        current_app.extensions[DOC_KEY] = document
    return respond(document)


@bp.get("/docs")
def docs_page() -> Response:
    return Response(DOCS_HTML, mimetype="text/html")


DOCS_HTML = (Path(__file__).with_name("docs.html")).read_text(encoding="utf-8")
