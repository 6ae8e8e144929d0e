"""The process-wide runtime: settings → database, slot locks, Redis, services.

Built once per process (`get_runtime()`), or explicitly in tests; the composition
root (`app.bootstrap`) wires it to the task layer. Nothing here knows about Flask or
Celery; those adapters ask the runtime for services.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import redis

from app import validation
from app.config import Settings, get_settings
from app.coordination.markers import Markers
from app.coordination.slot_locks import LocalSlotLocks, RedisSlotLocks, SlotLocks
from app.db import Database
from app.dispatch import Dispatcher, NotWired
from app.sessions.service import ServiceHooks, SessionService


@dataclass
class Runtime:
    settings: Settings
    database: Database
    locks: SlotLocks
    redis: redis.Redis | None
    hooks: ServiceHooks = field(default_factory=ServiceHooks)
    dispatcher: Dispatcher = field(default_factory=NotWired)

    @functools.cached_property
    def sessions(self) -> SessionService:
        return SessionService(
            database=self.database, locks=self.locks, settings=self.settings, hooks=self.hooks
        )

    @functools.cached_property
    def markers(self) -> Markers:
        return Markers(self.redis)

    def ensure_schema(self) -> None:
        """On the embedded SQLite default, bring the schema to head (one process owns the
        file). On MySQL the release step (`auto-session db upgrade`) does it instead."""
        if self.database.dialect != "sqlite" or self._schema_checked:
            return
        from app import migrate

        migrate.upgrade(self.database.url)
        self._schema_checked = True

    _schema_checked: bool = False

    def close(self) -> None:
        self.database.dispose()
        if isinstance(self.locks, RedisSlotLocks):
            self.locks.close()
        if self.redis is not None:
            self.redis.close()


def build_runtime(settings: Settings) -> Runtime:
    validation.configure(max_json_field_bytes=settings.max_json_field_bytes)
    database = Database(settings.sqlalchemy_url)
    client: redis.Redis | None = None
    locks: SlotLocks
    if settings.redis_url:
        client = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=2, socket_timeout=5,
            health_check_interval=30,
        )
        locks = RedisSlotLocks(
            client, prefix=settings.redis_key_prefix,
            ttl=settings.slot_lock_ttl, wait=settings.slot_lock_wait,
        )
    else:
        locks = LocalSlotLocks(wait=settings.slot_lock_wait)
    return Runtime(settings=settings, database=database, locks=locks, redis=client)


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process's runtime, built from the environment on first use and wired by the
    composition root."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _bootstrap(build_runtime(get_settings()))
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Replace the process runtime (tests, CLI with explicit settings), wired by the
    composition root."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime
        if runtime is not None:
            _bootstrap(runtime)


def _bootstrap(runtime: Runtime) -> Runtime:
    # Imported here: the composition root imports this module (and the task layer,
    # whose modules import this one).
    from app.bootstrap import bootstrap

    return bootstrap(runtime)
