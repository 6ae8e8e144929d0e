"""The Flask app factory: blueprints per resource, one error mapping, one runtime.

`create_app(runtime=None)` wires the given `Runtime` (tests pass theirs) or, by
default, the process runtime built from the environment on first use — lazily, so
that a gunicorn worker builds its own database pool and Redis client after fork.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from admin import views as admin_views
from app.api import (
    agents,
    docs,
    events,
    health,
    imports,
    ratelimit,
    sessions,
    transfers,
    webhooks,
)
from app.api.http import RUNTIME_KEY, limit_request_bodies
from app.api.metrics import bp as metrics_bp
from app.api.observe import init_app as observe_requests
from app.api.problems import register_error_handlers
from app.config import get_settings
from app.runtime import Runtime

BLUEPRINTS: tuple[Blueprint, ...] = (
    health.bp,
    docs.bp,
    sessions.bp,
    transfers.bp,
    agents.bp,
    events.bp,
    imports.bp,
    webhooks.bp,
    admin_views.bp,
    metrics_bp,
)

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
    observe_requests(app)
    ratelimit.init_app(app)
    limit_request_bodies(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    hops = (runtime.settings if runtime is not None else get_settings()).proxy_hops
    if hops:  # the client's address, scheme and host as the trusted proxies saw them
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
    return app
