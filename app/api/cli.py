"""`auto-session serve`: the HTTP API on the configured backend.

On the embedded default (SQLite, tasks in-process) it migrates the SQLite file
first and serves from one process (gunicorn, 1 worker with threads; werkzeug's
threaded server where gunicorn is unavailable). With MySQL + Redis configured, use
the Procfile's `web` line (several gunicorn workers) — `serve --workers N` does the
same.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import click


@click.command()
@click.option("--host", default=None, help="Interface to bind (default: HOST setting, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default: PORT setting, 8000).")
@click.option("--workers", default=1, show_default=True,
              help="gunicorn worker processes (must stay 1 on SQLite).")
@click.option("--threads", default=8, show_default=True, help="Threads per worker.")
def serve(host: str | None, port: int | None, workers: int, threads: int) -> None:
    """Start the HTTP API and print where it listens and how to get a token."""
    from app.config import get_settings
    from app.runtime import get_runtime

    settings = get_settings()
    host = host or settings.host
    port = port or settings.port
    runtime = get_runtime()
    if runtime.database.dialect == "sqlite":
        if workers != 1:
            raise click.ClickException("the embedded SQLite default serves from one process; "
                                       "use --workers 1 (threads give concurrency)")
        runtime.ensure_schema()
    from sqlalchemy.engine import make_url

    db = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)
    mode = "embedded: tasks in-process" if settings.embedded else f"Redis {settings.redis_url}"
    click.echo(f"Auto Session API on http://{host}:{port}  (database {db}; {mode})")
    click.echo(f"  docs:    http://{host}:{port}/docs")
    if settings.embedded:
        click.echo(f"  events:  http://{host}:{port}/api/v1/events/stream  (Server-Sent Events)")
    else:
        click.echo(f"  events:  the Procfile's `stream` process, port {settings.stream_port}")
    click.echo("  a token: auto-session clients create --name my-bot --role bot")
    click.echo("           (roles: bot, desk, admin; add --json for {\"client_id\", \"token\"})")
    sys.stdout.flush()
    runtime.close()  # the server's workers build their own connections

    gunicorn = _venv_gunicorn() or shutil.which("gunicorn")
    if gunicorn:
        import os

        args = [gunicorn, "--workers", str(workers), "--threads", str(threads),
                "--bind", f"{host}:{port}", "--access-logfile", "-", "--no-control-socket",
                "app.wsgi:app"]
        # The project's gunicorn settings (log format, metrics, streams ended at once on
        # SIGTERM) wherever this runs from: gunicorn reads only ./gunicorn.conf.py itself.
        # The flags above win over the file's sizing.
        if GUNICORN_CONF.exists():
            args[1:1] = ["--config", str(GUNICORN_CONF)]
        os.execv(gunicorn, args)
    from app.wsgi import app

    app.run(host=host, port=port, threaded=True)


GUNICORN_CONF = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"


def _venv_gunicorn() -> str | None:
    candidate = Path(sys.executable).with_name("gunicorn")
    return str(candidate) if candidate.exists() else None
