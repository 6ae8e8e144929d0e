"""An OpenAI-compatible chat-completions server on 127.0.0.1 for the grouping review tests
(the pattern of `tests/detection/llm_server.py`, answering the review's verdict)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ReviewServer:
    """`mode`: merge (continues, 0.95), keep (a new conversation, 0.9), unsure (continues,
    0.5), fenced (merge inside a ```json fence), garbage (prose), wrong (JSON of another
    shape), slow (answers after `delay` seconds), error (HTTP 500)."""

    def __init__(self) -> None:
        self.mode = "merge"
        self.delay = 3.0
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with outer._lock:
                    outer.requests.append({"path": self.path, "body": body,
                                           "auth": self.headers.get("Authorization")})
                if outer.mode == "error":
                    self._send(500, {"error": {"message": "overloaded"}})
                    return
                if outer.mode == "slow":
                    time.sleep(outer.delay)
                content = {
                    "merge": '{"continues": true, "confidence": 0.95}',
                    "keep": '{"continues": false, "confidence": 0.9}',
                    "unsure": '{"continues": true, "confidence": 0.5}',
                    "fenced": '```json\n{"continues": true, "confidence": 0.99}\n```',
                    "garbage": "These look like the same conversation to me.",
                    "wrong": '{"continues": "yes", "confidence": 2}',
                    "slow": '{"continues": true, "confidence": 0.99}',
                }[outer.mode]
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0,
                    "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                })

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout case)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][1]["content"] for r in self.requests]

    def __enter__(self) -> ReviewServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
