"""The WSGI entry point for gunicorn (`Procfile`: `gunicorn 'app.wsgi:app'`).

Settings come from the environment; the runtime (database pool, Redis) is built
lazily in each worker on its first request. On the embedded default there is no
beat process, so the periodic work (timeout sweeps, transfer escalation, the
webhook safety net) runs in a thread of this (single) worker instead.
"""

import threading

from app.config import get_settings
from app.factory import create_app
from app.observability import logs
from app.observability.metrics import process_started

logs.install(get_settings(), "web", loggers=("gunicorn.error", "gunicorn.access"),
             root_handler=True)
app = create_app()
process_started("web")

if get_settings().embedded:
    from tasks.sweeps import start_in_process_beat

    in_process_beat_stop = threading.Event()
    start_in_process_beat(in_process_beat_stop)
