"""The console's live event stream: `GET /admin/api/events/stream`, all events (an
admin's scope) for the console's pages (`static/live.js`), authenticated by the console
cookie or an admin bearer token (`admin_only`). Served like the API's stream
(`app.api.stream`): by the `stream` process, or on the embedded default by the web one.
"""

from __future__ import annotations

from flask import Blueprint, Response

from admin.auth import admin_client, admin_only
from app.api.stream import open_stream, preflight

bp = Blueprint("live", __name__, url_prefix="/api/events")


@bp.get("/stream", provide_automatic_options=False)
@admin_only
def stream() -> Response:
    return open_stream(admin_client())


@bp.route("/stream", methods=["OPTIONS"], provide_automatic_options=False)
def stream_preflight() -> Response:
    return preflight()
