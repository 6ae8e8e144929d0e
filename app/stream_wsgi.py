"""The WSGI entry point of the Procfile's `stream` process (`gunicorn --config
gunicorn_stream.conf.py 'app.stream_wsgi:app'`): the same app as `web`, served by
gevent workers (a stream is a greenlet, so a thousand open streams cost memory, not
threads), and the one process type that answers `GET /api/v1/events/stream` and the
console's `/admin/api/events/stream` (`app.api.stream`; `STREAM_SERVER` is its flag).
It runs no beat and writes nothing: each worker tails the outbox with one poller
(`app.events.stream.EventHub`).
"""

from app.factory import create_app

app = create_app(STREAM_SERVER=True)
