"""Who may use the admin API and the console, and how the console keeps its log-in.

Two doors, one rule (the caller is an *admin* API client):

- API callers send `Authorization: Bearer <admin token>` (as on every other API).
- The console logs in once with an admin token. The log-in is a row of
  `console_logins` (`admin.models.ConsoleLogin`); the cookie never holds the token, only
  the log-in's random secret (the table keeps its SHA-256), signed with SECRET_KEY,
  HTTP-only, SameSite=Lax, path /admin, Secure except on plain-http loopback (a
  developer's `make run`). Every request re-checks the row in one query: log-out marks it
  ended, so a copied cookie stops working; it lasts `LOGIN_HOURS` at most; and it ends
  when its client is revoked or its token rotated.
- Every request the console makes is charged to the admin client's request budget, and
  a bad token on the log-in page or a 401 of the admin API counts as a failed
  authentication of its address (`app.api.ratelimit`).
- CSRF: every console session has a random token; every state-changing request that
  authenticates by cookie must echo it, in the form field `csrf_token` or the
  `X-CSRF-Token` header (what the console's JavaScript sends). Bearer calls need none:
  a browser never attaches a bearer token by itself.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from flask import Flask, g, request, session
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from admin.logins import console_login_client, end_console_login, start_console_login
from app.api.auth import authenticate
from app.api.http import RUNTIME_KEY, runtime
from app.api.ratelimit import charge_client, count_failed_authentication
from app.clients.service import ClientIdentity, ClientRole, hash_token
from app.errors import Forbidden, Unauthorized
from app.observability import context

log = logging.getLogger(__name__)


COOKIE_NAME = "as_admin"
COOKIE_PATH = "/admin"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_HOURS = 12
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost"})

_process_secret: str | None = None


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session with the console's cookie attributes.

    Every request opens and saves a session, API calls included; a request without the
    console's cookie (every robot's call) gets an empty one without building the
    signing serializer, and an empty, unchanged session is not saved — what Flask's own
    code concludes for such a request, less its work (about 60 µs a call)."""

    def open_session(self, app: Flask, request: Any) -> SecureCookieSession | None:
        if app.secret_key and not request.cookies.get(COOKIE_NAME):
            return self.session_class()
        return super().open_session(app, request)

    def save_session(self, app: Flask, session: Any, response: Any) -> None:
        if not session and not session.modified:
            if session.accessed:
                response.vary.add("Cookie")
            return
        super().save_session(app, session, response)

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE_NAME

    def get_cookie_path(self, app: Flask) -> str:
        return COOKIE_PATH

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Lax"

    def get_cookie_secure(self, app: Flask) -> bool:
        """Secure, except for plain http to a loopback address (local development and
        the browser tests); behind a TLS proxy the host is not loopback, so it is set."""
        return not (request.scheme == "http" and is_loopback(request.host))


def is_loopback(host: str) -> bool:
    """`host` (a Host header: name or address, maybe with a port) is this machine."""
    name = urlsplit(f"//{host}").hostname or ""
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def configure_app(app: Flask) -> None:
    """Install the console's session cookie and make sure the app has a SECRET_KEY.

    SECRET_KEY comes from the `SECRET_KEY` setting. When it is unset, one random key is
    generated per process (and a warning logged): console log-ins then end when the
    process restarts and do not carry across several web processes — set SECRET_KEY in
    production."""
    global _process_secret
    app.session_interface = ConsoleSessionInterface()
    if app.config.get("SECRET_KEY"):
        return
    configured = None
    rt = app.extensions.get(RUNTIME_KEY)
    if rt is not None:
        configured = rt.settings.secret_key
    else:
        from app.config import get_settings

        configured = get_settings().secret_key
    if not configured:
        if _process_secret is None:
            _process_secret = secrets.token_urlsafe(32)
            log.warning("SECRET_KEY is not set: generated a random one for this process; "
                        "admin console log-ins end when it restarts and do not work across "
                        "several web processes. Set SECRET_KEY in production.")
        configured = _process_secret
    app.config["SECRET_KEY"] = configured


# ---- the console's log-in --------------------------------------------------------------------
def csrf_token() -> str:
    """This console session's CSRF token (created on first use)."""
    token = session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def check_csrf() -> None:
    expected = session.get("csrf")
    supplied = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD)
    if not expected or not supplied or not hmac.compare_digest(str(expected), str(supplied)):
        raise Forbidden("missing or wrong CSRF token; reload the page and try again")


def log_in(identity: ClientIdentity, token: str) -> None:
    """Start a console log-in for `identity` (the caller checked that it is an admin)."""
    lang = session.get("lang")
    session.clear()  # nothing from before the log-in survives it (fixation)
    session["login"] = start_console_login(
        runtime().database, client_id=identity.client_id, token_hash=hash_token(token),
        hours=LOGIN_HOURS)
    session["csrf"] = secrets.token_urlsafe(32)
    if lang:
        session["lang"] = lang


def log_out() -> None:
    """End the log-in on the server (a copy of the cookie stops working) and forget it."""
    secret = session.get("login")
    if isinstance(secret, str):
        end_console_login(runtime().database, secret)
    _forget_login()


def _forget_login() -> None:
    lang = session.get("lang")
    session.clear()
    if lang:
        session["lang"] = lang


def console_identity() -> ClientIdentity | None:
    """The admin behind the console cookie, re-checked against the database, or None.

    Charges the request to the admin's budget (once per request)."""
    if "console_identity" in g:
        return cast(ClientIdentity | None, g.console_identity)
    identity = None
    secret = session.get("login")
    if isinstance(secret, str) and len(secret) <= 128:
        with runtime().database.read() as db:
            row = console_login_client(db, secret)
        if row is not None:
            identity = ClientIdentity(row.client_id, row.name, ClientRole(row.role))
    if identity is None and secret is not None:
        _forget_login()
    g.console_identity = identity  # before charging: the 429 page renders as this admin
    if identity is not None:
        context.bind(client_id=identity.client_id)
        charge_client(identity)
    return identity


# ---- the admin API's door ----------------------------------------------------------------------
def admin_client() -> ClientIdentity:
    """The admin calling this request (inside an `admin_only` view)."""
    return cast(ClientIdentity, g.admin_client)


def admin_only[F: Callable[..., Any]](view: F) -> F:
    """Admit admin clients: by bearer token, or by console cookie (+ CSRF on writes).

    401 without credentials, 403 for a non-admin token or a bad CSRF token."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("Authorization"):
            client = authenticate()
            if client.role != ClientRole.ADMIN:
                raise Forbidden(f"role {client.role} may not call the admin API (allowed: admin)")
        else:
            identity = console_identity()
            if identity is None:
                count_failed_authentication()
                raise Unauthorized("send an admin token as 'Authorization: Bearer <token>' "
                                   "or log in to the console")
            if request.method not in SAFE_METHODS:
                check_csrf()
            client = identity
        g.admin_client = client
        return view(*args, **kwargs)

    wrapper.required_roles = ("admin",)  # type: ignore[attr-defined]
    return cast(F, wrapper)
