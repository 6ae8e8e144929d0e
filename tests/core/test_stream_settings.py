"""The stream's settings (SPEC §12): defaults, and bad values named at start-up — by the
settings and by the `stream` process's gunicorn configuration alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_stream_defaults() -> None:
    s = load_settings(_env_file=None)
    assert (s.stream_port, s.stream_keepalive_interval, s.stream_poll_interval,
            s.stream_max_connections, s.stream_cors_origins, s.stream_public_url) == (
        8001, 15.0, 0.2, 2000, None, None)
    listed = load_settings(_env_file=None, stream_cors_origins=" https://desk.example, "
                           "http://10.0.0.5:8000 ", stream_public_url="  ")
    assert listed.stream_cors_origins == "https://desk.example, http://10.0.0.5:8000"
    assert listed.stream_public_url is None


@pytest.mark.parametrize(("name", "value"), [
    ("stream_port", 0), ("stream_keepalive_interval", -1), ("stream_poll_interval", 0),
    ("stream_poll_interval", 60), ("stream_max_connections", 0),
    ("stream_cors_origins", "desk.example"), ("stream_cors_origins", "https://a.example,ftp://b"),
    ("stream_public_url", "javascript:alert(1)"),
])
def test_a_bad_stream_setting_is_named(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=name.upper()):
        load_settings(_env_file=None, **{name: value})


@pytest.mark.parametrize(("variable", "value"), [("STREAM_WORKERS", "two"),
                                                 ("STREAM_PORT", "-5")])
def test_the_stream_process_refuses_to_start_on_a_bad_value(variable: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAM_", "DATABASE_"))}
    env[variable] = value
    started = subprocess.run(
        [str(BIN / "gunicorn"), "--config", "gunicorn_stream.conf.py", "--check-config",
         "app.stream_wsgi:app"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60)
    assert started.returncode != 0
    assert variable in started.stdout + started.stderr
