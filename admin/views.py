"""The admin package's blueprint, registered by the app factory (`admin.views:bp`).

    /admin/api/...   the admin API (`admin.api`), JSON, admin clients only
    /admin/...       the console pages (`admin.console`) and their static files

Registering it also installs the console's session cookie and SECRET_KEY
(`admin.auth.configure_app`).
"""

from __future__ import annotations

from typing import cast

from flask import Blueprint, Flask
from flask.blueprints import BlueprintSetupState

from admin import api, console
from admin.auth import configure_app

bp = Blueprint(
    "admin", __name__, url_prefix="/admin", static_folder="static",
    static_url_path="/static",
)
bp.register_blueprint(api.bp)
bp.register_blueprint(console.bp)


@bp.record_once
def _configure(state: BlueprintSetupState) -> None:
    configure_app(cast(Flask, state.app))
