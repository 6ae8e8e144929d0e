"""A webhook receiver on 127.0.0.1 that records what it gets and can fail on purpose."""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    """`fail_first[key] = n`: answer 500 to the first n attempts of each event whose type,
    session id or shop id is `key` ('*' for every event)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # accepted (2xx) deliveries, in order
        self.attempts: Counter[str] = Counter()  # per delivery id
        self.fail_first: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    delivery_id = headers.get("x-autosession-delivery", "")
                    outer.attempts[delivery_id] += 1
                    shop = (body.get("data") or {}).get("shop_id") or ""
                    limit = max(outer.fail_first.get(body.get("session_id") or "", 0),
                                outer.fail_first.get(shop, 0),
                                outer.fail_first.get(body.get("type"), 0),
                                outer.fail_first.get("*", 0))
                    failing = outer.attempts[delivery_id] <= limit
                    if not failing:
                        outer.received.append({"raw": raw, "body": body, "headers": headers})
                status = 500 if failing else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/auto-session"

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.received]

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
