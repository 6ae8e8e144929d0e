"""What the request hooks of `app.api.observe` (trace id, one count, one duration sample)
cost a request (run by hand; never a timed test).

    python -m tests.benchmarks.bench_observability [--requests 20000] [--rounds 6]

In one process with prometheus_client's multiprocess mode on (a temporary
PROMETHEUS_MULTIPROC_DIR, as the Procfile's web workers run), the app answers
`GET /healthz` — the cheapest request, so the hooks' share is the largest it can be —
through its WSGI callable (no server, no socket), with the hooks and, alternately,
without them (the same app with the two hook functions removed). Reported: the
process CPU per request of each, the difference, and the difference as a share of the
request. Rounds alternate so that a machine busy with other work slows both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    os.environ.setdefault("DATA_DIR", tempfile.mkdtemp(prefix="bench-data-"))

    from app.api import observe
    from app.factory import create_app

    observed = create_app()
    bare = create_app()
    bare.before_request_funcs[None].remove(observe._start)
    bare.after_request_funcs[None].remove(observe._finish)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/healthz", "SERVER_NAME": "127.0.0.1",
               "SERVER_PORT": "8000", "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": None, "wsgi.errors": sys.stderr}

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        assert status.startswith("200")

    def per_request(app: Any) -> float:
        import io

        started = time.process_time()
        for _ in range(args.requests):
            env = dict(environ, **{"wsgi.input": io.BytesIO()})
            for _chunk in app.wsgi_app(env, start_response):
                pass
        return (time.process_time() - started) / args.requests * 1e6

    per_request(observed)
    per_request(bare)  # warm-up
    with_hooks, without = [], []
    for _ in range(args.rounds):
        with_hooks.append(per_request(observed))
        without.append(per_request(bare))
    a, b = statistics.median(with_hooks), statistics.median(without)
    print(f"GET /healthz through the WSGI app, {args.requests} requests x {args.rounds} "
          f"rounds, multiprocess metrics on ({len(os.listdir(folder))} files)")
    print(f"  with the hooks:    {a:7.1f} us CPU per request (median of rounds)")
    print(f"  without the hooks: {b:7.1f} us CPU per request")
    print(f"  the hooks cost:    {a - b:7.1f} us per request ({(a - b) / b:.1%} of the bare "
          "request)")


if __name__ == "__main__":
    main()
