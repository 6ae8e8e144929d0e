"""Migrations are code: they run up and down on the backend under test."""

from __future__ import annotations

import sqlalchemy as sa

from app import migrate
from app.models import Base


def test_migrations_upgrade_downgrade_and_match_the_models(backend, tmp_path):
    if backend.is_mysql:
        url = backend.database_url.rsplit("/", 1)[0] + "/auto_session_migrations"
        server = sa.create_engine(backend.server_url)
        with server.begin() as conn:
            conn.exec_driver_sql("DROP DATABASE IF EXISTS auto_session_migrations")
            conn.exec_driver_sql("CREATE DATABASE auto_session_migrations CHARACTER SET utf8mb4")
        server.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'mig.sqlite3'}"
    migrate.upgrade(url)
    engine = sa.create_engine(url)
    tables = set(sa.inspect(engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    engine.dispose()
    migrate.downgrade(url, "base")
    engine = sa.create_engine(url)
    assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate.upgrade(url)
