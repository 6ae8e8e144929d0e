"""Console log-ins (SPEC §7): one row per log-in, so a log-out or a revoked or rotated
token ends it at once; `admin.auth` keeps only the secret in the cookie."""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session as DbSession

from admin.models import ConsoleLogin
from app.clients.models import ApiClient
from app.clients.service import hash_token
from app.db import Database, utcnow


def start_console_login(database: Database, *, client_id: str, token_hash: str,
                        hours: float) -> str:
    """Record a console log-in of `client_id` lasting `hours`; answers the secret for the
    cookie (the table keeps only its SHA-256)."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    with database.unit_of_work() as uow:
        uow.session.add(ConsoleLogin(
            login_id=hash_token(secret), client_id=client_id, token_hash=token_hash,
            created_at=now, expires_at=now + timedelta(hours=hours),
        ))
        uow.commit()
    return secret


def console_login_client(db: DbSession, secret: str) -> ApiClient | None:
    """The admin client behind a console log-in, or None when the log-in ended (log-out),
    expired, or its client was revoked or given another token since — one query."""
    return db.execute(
        select(ApiClient)
        .join(ConsoleLogin, ConsoleLogin.client_id == ApiClient.client_id)
        .where(ConsoleLogin.login_id == hash_token(secret),
               ConsoleLogin.ended_at.is_(None),
               ConsoleLogin.expires_at > utcnow(),
               ApiClient.revoked_at.is_(None),
               ApiClient.token_hash == ConsoleLogin.token_hash,
               ApiClient.role == "admin")
    ).scalar_one_or_none()


def end_console_login(database: Database, secret: str) -> None:
    """Log-out: the log-in stops working at once, wherever its cookie was copied to."""
    with database.unit_of_work() as uow:
        uow.session.execute(
            update(ConsoleLogin)
            .where(ConsoleLogin.login_id == hash_token(secret), ConsoleLogin.ended_at.is_(None))
            .values(ended_at=utcnow())
        )
        uow.commit()
