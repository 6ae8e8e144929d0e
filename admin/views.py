"""The admin package's blueprint, registered by the app factory (`admin.views:bp`).

    /admin/api/...   the admin API (`admin.api`), JSON, admin clients only
    /admin/...       the console pages (`admin.console`) and their static files

Registering it also installs the console's session cookie and SECRET_KEY
(`admin.auth.configure_app`). Every answer under it carries the console's security
headers (SPEC §13, `console_security_headers`).
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Flask, Response, request
from flask.blueprints import BlueprintSetupState

from admin import api, console, corrections, live
from admin.auth import configure_app
from app.api.stream import stream_origin_for_console

bp = Blueprint(
    "admin", __name__, url_prefix="/admin", static_folder="static",
    static_url_path="/static",
)
bp.register_blueprint(api.bp)
bp.register_blueprint(console.bp)
bp.register_blueprint(corrections.api_bp)
bp.register_blueprint(corrections.console_bp)
bp.register_blueprint(live.bp)

# Scripts, styles, images and API calls from this origin only; the pages' JSON data
# blocks (`<script type="application/json">`) are data, not script, so no inline script,
# style, nonce or eval is allowed. No framing, no plugins, no <base>, forms post here.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@bp.record_once
def _configure(state: BlueprintSetupState) -> None:
    configure_app(cast(Flask, state.app))


@bp.after_request
def console_security_headers(response: Response) -> Response:
    """Pages, redirects, errors and the console's JSON calls are never cached (they show
    operator data); the static script and stylesheet keep their revalidated caching."""
    response.headers.update(SECURITY_HEADERS)
    stream_origin = stream_origin_for_console()  # live.js opens the `stream` process's port
    if stream_origin:
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY.replace(
            "connect-src 'self'", f"connect-src 'self' {stream_origin}")
    if request.endpoint != "admin.static":
        response.headers["Cache-Control"] = "no-store"
    return response
