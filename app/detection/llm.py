"""The optional LLM analyser: any OpenAI-compatible chat-completions endpoint (SPEC §5).

It asks for a structured verdict — need_human, reason, urgency, suggestion — and
accepts nothing else: a timeout, a transport error, a non-2xx answer or content
that is not that JSON object raises `LlmUnavailable`, and the caller keeps the
rules' verdict.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.detection.rules import ChatLine, excerpt

SYSTEM_PROMPT = (
    "You watch a chat between an e-commerce robot (our side) and a customer or shop "
    "(the counterpart). Decide whether a human agent must take over: the counterpart asks "
    "for a person, has an after-sales problem (refund, return, exchange, damaged goods), "
    "complains or threatens escalation, or the robot is failing (repeating itself, not "
    "understood). Plain bargaining and pre-purchase questions do not need a human. Answer "
    'with one JSON object only: {"need_human": true|false, "reason": "<short reason>", '
    '"urgency": 1-4 (1 most urgent), "suggestion": "<what the agent should do first>"}.'
)
ROLE_LABEL = {"robot": "ROBOT", "human": "AGENT", "counterpart": "CUSTOMER", "system": "SYSTEM"}
# Characters of each message sent to the model (head and tail of a longer one), so a
# huge pasted message costs neither the model's context nor a slow request.
LINE_LIMIT = 2000


class LlmUnavailable(Exception):
    """The analyser gave no usable verdict; the message says why (for the log)."""


class LlmVerdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    need_human: bool
    reason: str = Field(default="", max_length=2000)
    urgency: int = Field(default=3, ge=1, le=4)
    suggestion: str | None = Field(default=None, max_length=4000)


def conversation_text(lines: Sequence[ChatLine]) -> str:
    return "\n".join(
        f"{ROLE_LABEL.get(str(line.sender_role), 'OTHER')}: {excerpt(line.content, LINE_LIMIT)}"
        for line in lines
    )


def _json_object(content: str) -> Any:
    """The JSON object in a model's answer, tolerating a ```json fence around it."""
    text = content.strip()
    fenced = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.S)
    if fenced:
        text = fenced.group(1)
    return json.loads(text)


def chat_verdict[V: BaseModel](
    http: httpx.Client, *, base_url: str, model: str, api_key: str | None, timeout: float,
    system: str, user: str, verdict: type[V],
) -> V:
    """One OpenAI-compatible chat-completions call whose answer must be one JSON object of
    `verdict`'s shape (a ```json fence is tolerated); LlmUnavailable on any failure —
    timeout, HTTP error, or a malformed answer — so the caller keeps its rule's result."""
    body = {
        "model": model,
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/chat/completions"
    try:
        response = http.post(url, json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        content = response.json()["choices"][0]["message"]["content"]
        return verdict.model_validate(_json_object(content))
    except httpx.TimeoutException as exc:
        raise LlmUnavailable(f"no answer within {timeout}s from {url}") from exc
    except httpx.HTTPError as exc:
        raise LlmUnavailable(f"request to {url} failed: {exc}") from exc
    except (KeyError, IndexError, TypeError, ValueError, ValidationError) as exc:
        raise LlmUnavailable(f"malformed answer from {url}: {str(exc)[:200]}") from exc


def analyse(
    lines: Sequence[ChatLine],
    *,
    base_url: str,
    model: str,
    api_key: str | None,
    timeout: float,
    client: httpx.Client | None = None,
) -> LlmVerdict:
    """Ask the endpoint about the conversation; raise LlmUnavailable on any failure."""
    http = client or httpx.Client(timeout=httpx.Timeout(timeout))
    try:
        return chat_verdict(http, base_url=base_url, model=model, api_key=api_key,
                            timeout=timeout, system=SYSTEM_PROMPT,
                            user=conversation_text(lines), verdict=LlmVerdict)
    finally:
        if client is None:
            http.close()
