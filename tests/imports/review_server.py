"""An OpenAI-compatible chat-completions server on 127.0.0.1 for the grouping review tests:
`tests/detection/llm_server.py`'s server answering the review's verdict."""

from __future__ import annotations

from typing import ClassVar

from tests.detection.llm_server import ChatCompletionsServer


class ReviewServer(ChatCompletionsServer):
    """`mode`: merge (continues, 0.95), keep (a new conversation, 0.9), unsure (continues,
    0.5), fenced (merge inside a ```json fence), garbage (prose), wrong (JSON of another
    shape), slow (answers after `delay` seconds), error (HTTP 500)."""

    REPLIES: ClassVar[dict[str, str]] = {
        "merge": '{"continues": true, "confidence": 0.95}',
        "keep": '{"continues": false, "confidence": 0.9}',
        "unsure": '{"continues": true, "confidence": 0.5}',
        "fenced": '```json\n{"continues": true, "confidence": 0.99}\n```',
        "garbage": "These look like the same conversation to me.",
        "wrong": '{"continues": "yes", "confidence": 2}',
        "slow": '{"continues": true, "confidence": 0.99}',
    }
    DEFAULT_MODE = "merge"

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][1]["content"] for r in self.requests]
