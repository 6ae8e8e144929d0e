"""Test fixtures: a clean database (SQLite or MariaDB) and real Redis for every test.

Pick the backend with `--backend sqlite|mysql` or `TEST_BACKEND`. The mysql backend
uses `TEST_MYSQL_URL` (server URL, default root@127.0.0.1:3306) and `TEST_REDIS_URL`
(default redis://127.0.0.1:6379/15). Without the services, mysql-backed tests skip
with a reason — except under `CI=true`, where they must run and the run fails.
Tests marked `services` need real MariaDB + Redis (processes, races); they run in
the mysql pass only.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from app import migrate
from app.config import Settings, load_settings
from app.models import Base
from app.runtime import Runtime, build_runtime, set_runtime

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=["sqlite", "mysql"],
        default=os.environ.get("TEST_BACKEND", "sqlite"),
        help="database backend for the suite (default: $TEST_BACKEND or sqlite)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sqlite_only: meaningful only on the SQLite backend")


# The limiter stays on (every request is counted, as in production), with budgets that a
# test's bursts from one client or address never spend; tests/api/test_rate_limits.py
# sets small ones.
GENEROUS_RATE_LIMITS = {
    "rate_limit_bot": "100000/second",
    "rate_limit_desk": "100000/second",
    "rate_limit_admin": "100000/second",
    "rate_limit_auth_failures": "100000/minute",
}


def _worker_suffix() -> str:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    extra = os.environ.get("TEST_DB_SUFFIX", "")
    return "".join(part for part in (extra, worker) if part)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class Backend:
    """What the chosen backend needs: URLs, and whether its services answer."""

    def __init__(self, name: str, tmp_root: Path) -> None:
        self.name = name
        suffix = _worker_suffix()
        self.redis_url: str | None = None
        self.problem: str | None = None
        if name == "sqlite":
            self.database_url = f"sqlite:///{tmp_root / f'test{suffix}.sqlite3'}"
            return
        server = os.environ.get("TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/")
        self.server_url = sa.engine.make_url(server)
        self.db_name = f"auto_session_test{('_' + suffix) if suffix else ''}"
        self.database_url = self.server_url.set(database=self.db_name).render_as_string(
            hide_password=False
        )
        self.redis_url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
        redis_parsed = redis.connection.parse_url(self.redis_url)
        if not _reachable(self.server_url.host or "127.0.0.1", self.server_url.port or 3306):
            self.problem = f"MariaDB/MySQL not reachable at {self.server_url.host}"
        elif not _reachable(redis_parsed.get("host", "127.0.0.1"), redis_parsed.get("port", 6379)):
            self.problem = f"Redis not reachable at {self.redis_url}"

    @property
    def is_mysql(self) -> bool:
        return self.name == "mysql"

    def create_database(self) -> None:
        if not self.is_mysql:
            return
        engine = sa.create_engine(self.server_url)
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{self.db_name}`")
            conn.exec_driver_sql(
                f"CREATE DATABASE `{self.db_name}` CHARACTER SET utf8mb4 "
                "COLLATE utf8mb4_unicode_ci"
            )
        engine.dispose()

    def settings(self, tmp_path: Path, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "data_dir": tmp_path,
            "redis_key_prefix": f"as-test{_worker_suffix()}",
            "_env_file": None,
            **GENEROUS_RATE_LIMITS,
        }
        values.update(overrides)
        return load_settings(**values)

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (workers, servers) on this backend."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_"))}
        env["DATABASE_URL"] = self.database_url
        env["REDIS_KEY_PREFIX"] = f"as-test{_worker_suffix()}"
        env.update({name.upper(): value for name, value in GENEROUS_RATE_LIMITS.items()})
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return env


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    chosen = Backend(request.config.getoption("--backend"), tmp_path_factory.mktemp("db"))
    if chosen.problem:
        if IN_CI:
            pytest.exit(f"CI=true but the mysql backend is unusable: {chosen.problem}", 2)
        pytest.skip(f"mysql backend unavailable: {chosen.problem}")
    chosen.create_database()
    migrate.upgrade(chosen.database_url)
    return chosen


@pytest.fixture(autouse=True)
def _services_marker(request: pytest.FixtureRequest) -> None:
    backend_name = request.config.getoption("--backend")
    if request.node.get_closest_marker("services") and backend_name != "mysql":
        pytest.skip("needs MariaDB + Redis: runs in the mysql pass (--backend mysql)")
    if request.node.get_closest_marker("sqlite_only") and backend_name != "sqlite":
        pytest.skip("SQLite-specific behaviour")


def _clean(runtime: Runtime) -> None:
    with runtime.database.engine.begin() as conn:
        if runtime.database.dialect == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=0")
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
        if runtime.database.dialect == "mysql":
            conn.exec_driver_sql("SET FOREIGN_KEY_CHECKS=1")
    if runtime.redis is not None:
        runtime.redis.flushdb()


def _join_delivery_threads(timeout: float) -> None:
    """Wait for the in-process dispatcher's delivery threads (`InProcessDispatcher`)."""
    from tasks.dispatch import DELIVERY_THREAD

    end = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == DELIVERY_THREAD:
            thread.join(max(0.0, end - time.monotonic()))
            assert not thread.is_alive(), "a webhook delivery thread outlived its test"


@pytest.fixture
def settings(backend: Backend, tmp_path: Path) -> Settings:
    return backend.settings(tmp_path)


@pytest.fixture
def runtime(backend: Backend, settings: Settings) -> Iterator[Runtime]:
    """A clean database and Redis, wired as this process's runtime."""
    rt = build_runtime(settings)
    rt._schema_checked = True  # migrated once per session by `backend`
    _clean(rt)
    set_runtime(rt)
    try:
        yield rt
    finally:
        # background detection and webhook delivery (embedded default) must not write
        # into the next test (a late delivery run recreated a cleaned client's cursor)
        from tasks.detection import drain_in_process

        drain_in_process(30)
        _join_delivery_threads(30)
        set_runtime(None)
        rt.close()


@pytest.fixture
def service(runtime: Runtime):  # type: ignore[no-untyped-def]
    return runtime.sessions
