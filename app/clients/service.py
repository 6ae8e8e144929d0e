"""API clients: create, rotate, revoke, authenticate (SPEC §8).

A token is 32 random bytes (url-safe text) shown once at creation. Only its
SHA-256 is stored: the token has 256 bits of entropy, so a fast hash is enough
(no password stretching needed) and lets the lookup use the unique index. The
final comparison is constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from app.clients.models import ApiClient
from app.db import Database, utcnow
from app.errors import NotFound, ValidationFailed
from app.ids import new_id
from app.validation import unicode_problem

TOKEN_PREFIX = "ast_"


class ClientRole(StrEnum):
    BOT = "bot"  # upstream robot systems: robot sessions, only their own
    DESK = "desk"  # the human customer-service system: human sessions, transfers, agents
    ADMIN = "admin"  # everything


@dataclass(frozen=True)
class ClientIdentity:
    """Who is calling: what views and services need to know about an API client."""

    client_id: str
    name: str
    role: ClientRole

    @property
    def actor(self) -> str:
        """The audit actor string for this client."""
        return f"client:{self.client_id}"

    @property
    def is_admin(self) -> bool:
        return self.role == ClientRole.ADMIN

    @property
    def is_desk(self) -> bool:
        return self.role == ClientRole.DESK

    @property
    def is_bot(self) -> bool:
        return self.role == ClientRole.BOT


@dataclass(frozen=True)
class IssuedToken:
    client_id: str
    token: str
    name: str
    role: ClientRole


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_role(value: str) -> ClientRole:
    try:
        return ClientRole(value.strip().lower())
    except ValueError:
        raise ValidationFailed(
            f"unknown role {value!r}; use bot, desk or admin",
            errors=[{"field": "role", "message": "must be bot, desk or admin"}],
        ) from None


class ClientService:
    """Client bookkeeping over one database. Each method is its own transaction.

    `authenticate` keeps a short in-process cache (`cache_seconds`, default 5 s) of
    token hash → identity, so a busy API does not read `api_clients` on every call;
    a revocation therefore takes effect within that many seconds in other processes
    (immediately in the process that revoked).
    """

    def __init__(self, database: Database, *, cache_seconds: float = 5.0) -> None:
        self.database = database
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, ClientIdentity | None]] = {}
        self._cache_lock = threading.Lock()

    def create(
        self, *, name: str, role: str | ClientRole, webhook_url: str | None = None,
        allow_private_webhook: bool = False, resolve_timeout: float = 5.0,
    ) -> IssuedToken:
        """A new client and its token (the only time the token is visible). A webhook URL
        is registered as `PUT /api/v1/webhook` would (the URL policy, a signing secret,
        delivery from now on), in the same transaction."""
        from app.delivery.service import check_webhook_url, register_webhook

        problem = unicode_problem(name)
        if problem:
            raise ValidationFailed(f"name {problem}",
                                   errors=[{"field": "name", "message": problem}])
        name = name.strip()
        if not name or len(name) > 128:
            raise ValidationFailed(
                "name must be 1 to 128 characters",
                errors=[{"field": "name", "message": "must be 1 to 128 characters"}],
            )
        chosen = parse_role(str(role))
        token = new_token()
        client = ApiClient(
            client_id=new_id("cli"),
            name=name,
            role=chosen,
            token_hash=hash_token(token),
            token_prefix=token[:12],
            created_at=utcnow(),
        )
        if webhook_url is not None:
            check_webhook_url(webhook_url, allow_private=allow_private_webhook,
                              resolve_timeout=resolve_timeout)
        with self.database.unit_of_work() as uow:
            uow.session.add(client)
            if webhook_url is not None:
                uow.session.flush()
                register_webhook(uow.session, client.client_id, webhook_url,
                                 allow_private=True)  # checked above, outside the transaction
            uow.commit()
        return IssuedToken(client_id=client.client_id, token=token, name=name, role=chosen)

    def rotate(self, client_id: str) -> IssuedToken:
        """Replace a client's token; the old one stops working at once."""
        token = new_token()
        with self.database.unit_of_work() as uow:
            client = self._load(uow.session, client_id)
            if client.revoked_at is not None:
                raise ValidationFailed(f"client {client_id} is revoked")
            old_hash = client.token_hash
            client.token_hash = hash_token(token)
            client.token_prefix = token[:12]
            uow.commit()
            name, role = client.name, ClientRole(client.role)
        self._forget(old_hash)
        return IssuedToken(client_id=client_id, token=token, name=name, role=role)

    def revoke(self, client_id: str) -> None:
        """Revoke a client: its token is refused from now on (idempotent)."""
        with self.database.unit_of_work() as uow:
            client = self._load(uow.session, client_id)
            if client.revoked_at is None:
                client.revoked_at = utcnow()
            token_hash = client.token_hash
            uow.commit()
        self._forget(token_hash)

    def list(self) -> list[ApiClient]:
        with self.database.read() as db:
            return list(db.execute(select(ApiClient).order_by(ApiClient.created_at)).scalars())

    def authenticate(self, token: str) -> ClientIdentity | None:
        """The identity behind a bearer token, or None (unknown, malformed or revoked)."""
        if not token or len(token) > 256:
            return None
        digest = hash_token(token)
        now = time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        identity = self._lookup(digest)
        with self._cache_lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now + self.cache_seconds, identity)
        return identity

    def _lookup(self, digest: str) -> ClientIdentity | None:
        with self.database.read() as db:
            client = db.execute(
                select(ApiClient).where(ApiClient.token_hash == digest)
            ).scalar_one_or_none()
        if client is None or client.revoked_at is not None:
            return None
        if not hmac.compare_digest(client.token_hash.encode(), digest.encode()):
            return None  # pragma: no cover - the index matched on equality
        return ClientIdentity(client.client_id, client.name, ClientRole(client.role))

    def _forget(self, digest: str) -> None:
        with self._cache_lock:
            self._cache.pop(digest, None)

    @staticmethod
    def _load(db: DbSession, client_id: str) -> ApiClient:
        client = db.get(ApiClient, client_id)
        if client is None:
            raise NotFound(f"client {client_id} not found")
        return client
