"""A tiny OpenAI-compatible chat-completions server on 127.0.0.1 for the LLM tests."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self


class ChatCompletionsServer:
    """`mode`: good (a need_human verdict), calm (need_human false), slow (answers after
    `delay` seconds), garbage (prose instead of JSON), error (HTTP 500). A subclass
    answers other verdicts by giving its own `REPLIES` (mode → the assistant's content)."""

    REPLIES: ClassVar[dict[str, str]] = {
        "good": json.dumps({"need_human": True, "reason": "客户对质量不满，需要人工",
                            "urgency": 1, "suggestion": "先道歉，再核实订单"},
                           ensure_ascii=False),
        "calm": '```json\n{"need_human": false, "reason": "bargaining", '
                '"urgency": 4, "suggestion": null}\n```',
        "slow": json.dumps({"need_human": True, "reason": "late", "urgency": 2,
                            "suggestion": "x"}),
        "garbage": "I think a human should probably look at this one.",
    }
    DEFAULT_MODE = "good"

    def __init__(self) -> None:
        self.mode = self.DEFAULT_MODE
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
                content = outer.REPLIES[outer.mode]
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

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
