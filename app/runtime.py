"""The process-wide wiring: settings → database, slot locks, Redis, services.

Built once per process (`get_runtime()`), or explicitly in tests. Nothing here
knows about Flask or Celery; those adapters ask the runtime for services.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import redis

from app import validation
from app.config import Settings, get_settings
from app.db import Database
from app.sessions.service import ServiceHooks, SessionService
from app.sessions.slot import LocalSlotLocks, RedisSlotLocks, SlotLocks


@dataclass
class Runtime:
    settings: Settings
    database: Database
    locks: SlotLocks
    redis: redis.Redis | None
    hooks: ServiceHooks = field(default_factory=ServiceHooks)

    @functools.cached_property
    def sessions(self) -> SessionService:
        return SessionService(
            database=self.database, locks=self.locks, settings=self.settings, hooks=self.hooks
        )

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
    """The process's runtime, built from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = build_runtime(get_settings())
            _install_task_hooks(_runtime)
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Replace the process runtime (tests, CLI with explicit settings)."""
    global _runtime
    with _runtime_lock:
        _runtime = runtime
        if runtime is not None:
            _install_task_hooks(runtime)


def _install_task_hooks(runtime: Runtime) -> None:
    """Let the task layer wire after-commit hooks, if it is importable."""
    try:
        from tasks.hooks import install_hooks
    except ImportError:
        return
    install_hooks(runtime)
