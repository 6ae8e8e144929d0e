"""The Flask app factory: blueprints per resource, one error mapping, one runtime.

`create_app(runtime=None)` wires the given `Runtime` (tests pass theirs) or, by
default, the process runtime built from the environment on first use — lazily, so
that a gunicorn worker builds its own database pool and Redis client after fork.

Other features add their blueprints by naming them in `OPTIONAL_BLUEPRINTS`
("module:attribute"); a module that does not exist yet is skipped (only an
ImportError of that very module is tolerated — an error inside it still fails).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from flask import Blueprint, Flask

from app.api import agents, docs, events, health, sessions, transfers
from app.api.http import RUNTIME_KEY
from app.api.problems import register_error_handlers
from app.runtime import Runtime

log = logging.getLogger(__name__)

CORE_BLUEPRINTS: tuple[Blueprint, ...] = (
    health.bp,
    docs.bp,
    sessions.bp,
    transfers.bp,
    agents.bp,
    events.bp,
)

# Blueprints of features built alongside the API; registered when importable.
OPTIONAL_BLUEPRINTS: list[str] = [
    "app.imports.views:bp",
    "app.delivery.views:bp",
    "admin.views:bp",
]

MAX_BODY_BYTES = 64 * 1024 * 1024  # uploads (imports) are the largest bodies


def create_app(runtime: Runtime | None = None, **config: Any) -> Flask:
    """A configured app; `config` overrides Flask settings (e.g. EVENTS_SETTLE_SECONDS)."""
    app = Flask("auto_session")
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        JSON_SORT_KEYS=False,
    )
    if runtime is not None:
        app.config["SECRET_KEY"] = runtime.settings.secret_key
        app.extensions[RUNTIME_KEY] = runtime
    app.config.update(config)
    register_error_handlers(app)
    for blueprint in CORE_BLUEPRINTS:
        app.register_blueprint(blueprint)
    for target in OPTIONAL_BLUEPRINTS:
        optional = load_optional_blueprint(target)
        if optional is not None:
            app.register_blueprint(optional)
    return app


def load_optional_blueprint(target: str) -> Blueprint | None:
    """`module:attr` → the blueprint, or None if that module does not exist (yet)."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            log.debug("optional blueprint %s not present", target)
            return None
        raise
    return getattr(module, attribute or "bp")
