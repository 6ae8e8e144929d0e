"""Bearer-token authentication and role checks for every API blueprint.

Usage (stable; other blueprints — imports, delivery, admin — import exactly this)::

    from app.api.auth import current_client, require_roles

    @bp.get("/things/<thing_id>")
    @require_roles("desk", "admin")          # 401 without/with a bad token, 403 for a bot
    def get_thing(thing_id: str) -> Response:
        client = current_client()            # ClientIdentity(client_id, name, role)
        ...  client.client_id, client.role, client.is_admin, client.actor ...

`require_roles()` with no argument admits any authenticated client. Roles are
"bot", "desk" and "admin" (`app.clients.service.ClientRole`); "admin" is not
implied, name it when admins may call. Answers are RFC 9457 problems:
401 (`/problems/unauthorized`, with `WWW-Authenticate: Bearer`) when the token is
missing, malformed, unknown or revoked; 403 (`/problems/forbidden`) when the
client's role is not listed; 429 (`/problems/rate-limited`) when the client spent its
role's request budget, or when its address failed to authenticate too often
(`app.api.ratelimit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import current_app, g, request

from app.api.http import runtime
from app.api.ratelimit import charge_client, count_failed_authentication
from app.clients.service import ClientIdentity, ClientRole, ClientService
from app.errors import Forbidden, Unauthorized
from app.observability import context

F = TypeVar("F", bound=Callable[..., Any])

CLIENTS_KEY = "auto_session.clients"
ALL_ROLES = tuple(str(r) for r in ClientRole)


def client_service() -> ClientService:
    """The app's client service (one per app: it holds the token cache)."""
    service: ClientService | None = current_app.extensions.get(CLIENTS_KEY)
    if service is None:
        service = ClientService(runtime().database)
        current_app.extensions[CLIENTS_KEY] = service
    return service


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate() -> ClientIdentity:
    """The calling client, authenticated once per request and charged one request of its
    budget; raises Unauthorized (or RateLimited past a limit)."""
    cached: ClientIdentity | None = g.get("api_client")
    if cached is not None:
        return cached
    token = bearer_token()
    if token is None:
        count_failed_authentication()
        raise Unauthorized("send an API token as 'Authorization: Bearer <token>'")
    identity = client_service().authenticate(token)
    if identity is None:
        count_failed_authentication()
        raise Unauthorized("the API token is not valid (unknown or revoked)")
    context.bind(client_id=identity.client_id)  # in the request's log lines from here on
    charge_client(identity)
    g.api_client = identity
    return identity


def current_client() -> ClientIdentity:
    """The authenticated client of this request (inside a `require_roles` view)."""
    return authenticate()


def require_roles(*roles: str) -> Callable[[F], F]:
    """Admit authenticated clients whose role is one of `roles` (any role if none given)."""
    allowed = tuple(str(ClientRole(r)) for r in roles) or ALL_ROLES

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            client = authenticate()
            if str(client.role) not in allowed:
                raise Forbidden(
                    f"role {client.role} may not call this operation "
                    f"(allowed: {', '.join(allowed)})"
                )
            return view(*args, **kwargs)

        wrapper.required_roles = allowed  # type: ignore[attr-defined]  # read by openapi
        return cast(F, wrapper)

    return decorate
