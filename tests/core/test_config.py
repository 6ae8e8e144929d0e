"""Settings (SPEC §10): defaults, the seed's DATABASE_* parts, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_seeds_and_the_embedded_default():
    s = load_settings(_env_file=None, data_dir=Path("/tmp/x"))
    assert (s.default_session_timeout, s.pending_timeout, s.human_session_timeout,
            s.transfer_timeout, s.max_concurrent_sessions, s.batch_size, s.session_gap) == (
        1800, 1800, 28800, 300, 10, 100, 1800)
    assert s.embedded and s.sqlalchemy_url == "sqlite:////tmp/x/auto_session.sqlite3"


def test_seed_database_parts_build_a_mysql_url():
    s = load_settings(_env_file=None, database_host="db.internal", database_port=3307,
                      database_name="as", database_user="svc", database_password="p@ss word")
    assert s.sqlalchemy_url == "mysql+pymysql://svc:p%40ss+word@db.internal:3307/as?charset=utf8mb4"


def test_database_url_wins_and_plain_mysql_scheme_gets_the_driver():
    s = load_settings(_env_file=None, database_url="mysql://u@h/db", database_host="ignored")
    assert s.sqlalchemy_url == "mysql+pymysql://u@h/db"


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("DEFAULT_SESSION_TIMEOUT", "soon", "DEFAULT_SESSION_TIMEOUT"),
    ("TRANSFER_TIMEOUT", "-5", "TRANSFER_TIMEOUT"),
    ("TIMEZONE", "Mars/Olympus", "TIMEZONE"),
])
def test_bad_value_names_the_variable(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    assert needle in str(caught.value)


@pytest.mark.parametrize(("name", "value", "secret"), [
    ("METRICS_TOKEN", "hunter2-short", "hunter2"),  # too short: refused, never echoed
    ("STREAM_PUBLIC_URL", "ftp://ops:hunter2@stream.example", "hunter2"),
])
def test_a_refused_secret_is_named_but_never_shown(monkeypatch, name, value, secret):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None)
    assert name in str(caught.value) and secret not in str(caught.value)


def test_bad_value_stops_the_command_with_the_name(tmp_path):
    env = {**os.environ, "SESSION_GAP": "half an hour", "DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "db", "current"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "SESSION_GAP" in done.stderr and "Traceback" not in done.stderr


def test_env_file_is_read(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("BATCH_SIZE=250\nTIMEZONE=Asia/Shanghai\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.batch_size == 250 and s.timezone == "Asia/Shanghai"
