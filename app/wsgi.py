"""The WSGI entry point for gunicorn (`Procfile`: `gunicorn 'app.wsgi:app'`).

Settings come from the environment; the runtime (database pool, Redis) is built
lazily in each worker on its first request.
"""

from app.factory import create_app

app = create_app()
