"""Migrations are code: they run up and down on the backend under test."""

from __future__ import annotations

import sqlalchemy as sa

from app import migrate
from app.models import Base


def test_migrations_upgrade_downgrade_and_match_the_models(backend, tmp_path):
    if backend.is_mysql:
        name = f"{backend.db_name}_migrations"  # apart from concurrent runs, like the suite's
        url = backend.database_url.rsplit("/", 1)[0] + f"/{name}"
        server = sa.create_engine(backend.server_url)
        with server.begin() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
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
