"""The optional LLM review of ambiguous gap-rule boundaries (SPEC §4 step 4d).

A boundary the gap rule put where the silence lies between GROUPING_REVIEW_MIN_GAP and
GROUPING_REVIEW_MAX_GAP is put to an OpenAI-compatible chat-completions endpoint, one
boundary a call, with the messages nearest to it on both sides (at most
`CONTEXT_MESSAGES` a side, each cut to `CONTENT_CHARS` characters). The answer must be
one JSON object `{"continues": bool, "confidence": 0..1}`; `continues` at or above the
confidence threshold merges the two segments. A timeout, a transport error, a non-2xx
answer or anything else than that object keeps the rule's boundary, and so does a call
past the job's budget (GROUPING_REVIEW_MAX_CALLS, reserved on the job one call at a
time, so parallel chunks share it).

It runs in the import worker, before the chunk's transaction (no lock is held while the
model thinks), a few calls at once, and gives up asking after `CHUNK_SECONDS` so that
a slow endpoint cannot push a chunk past its task's time limit. Nothing here runs, and
nothing is read, when the upload's `review` option is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from app.detection.llm import ROLE_LABEL, LlmUnavailable, chat_verdict
from app.detection.rules import excerpt
from app.imports.segmenting import Boundary

if TYPE_CHECKING:
    from app.imports.rows import Msg

log = logging.getLogger(__name__)

CONTEXT_MESSAGES = 6  # messages on each side of a boundary in the prompt
CONTENT_CHARS = 500  # characters of each (head and tail of a longer one)
PARALLEL_CALLS = 4  # calls of one chunk in flight at once
CHUNK_SECONDS = 300.0  # a chunk asks no more after this long (its task's limit is 900 s)

SYSTEM_PROMPT = (
    "You review how an exported customer-service chat was cut into conversations. Two "
    "stretches of one customer's chat are separated by a silence. Decide whether the "
    "messages after the silence continue the same conversation (the same request, "
    "question or order, picked up again) or start a new one. Answer with one JSON object "
    'only: {"continues": true|false, "confidence": <0..1>}.'
)


class ReviewUnavailable(Exception):
    """The endpoint gave no usable verdict; the message says why (for the log)."""


class ReviewVerdict(BaseModel):
    model_config = ConfigDict(extra="ignore")

    continues: StrictBool
    confidence: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


@dataclass(frozen=True)
class ReviewEndpoint:
    base_url: str
    model: str
    api_key: str | None
    timeout: float


def boundary_prompt(boundary: Boundary) -> str:
    """The messages near the boundary (never more), the silence between them."""
    def lines(msgs: Sequence[Msg]) -> list[str]:
        return [f"[{m.sent_at:%Y-%m-%d %H:%M}] {ROLE_LABEL.get(str(m.sender_role), 'OTHER')}: "
                f"{excerpt(m.content, CONTENT_CHARS)}" for m in msgs]

    minutes = int(boundary.gap.total_seconds() // 60)
    return "\n".join([
        "BEFORE THE SILENCE:", *lines(boundary.before[-CONTEXT_MESSAGES:]),
        f"--- silence of {minutes // 60} h {minutes % 60} min ---",
        "AFTER THE SILENCE:", *lines(boundary.after[:CONTEXT_MESSAGES]),
    ])


def ask(boundary: Boundary, endpoint: ReviewEndpoint, client: httpx.Client) -> ReviewVerdict:
    """One chat-completions call about one boundary; ReviewUnavailable on any failure."""
    try:
        return chat_verdict(client, base_url=endpoint.base_url, model=endpoint.model,
                            api_key=endpoint.api_key, timeout=endpoint.timeout,
                            system=SYSTEM_PROMPT, user=boundary_prompt(boundary),
                            verdict=ReviewVerdict)
    except LlmUnavailable as exc:
        raise ReviewUnavailable(str(exc)) from exc


@dataclass
class ReviewOutcome:
    """Verdicts by the id of the first row after each judged boundary (True merges)."""

    verdicts: dict[str, bool] = field(default_factory=dict)
    reviewed: int = 0
    merged: int = 0


@dataclass
class BoundaryReviewer:
    """Judges boundaries within a budget: `reserve()` grants one call (the job's
    conditional UPDATE) or refuses once the job spent GROUPING_REVIEW_MAX_CALLS."""

    endpoint: ReviewEndpoint
    confidence: float
    reserve: Callable[[], bool]
    min_gap: timedelta = timedelta(seconds=600)
    max_gap: timedelta = timedelta(seconds=86400)
    parallel: int = PARALLEL_CALLS
    chunk_seconds: float = CHUNK_SECONDS

    def review(self, boundaries: Sequence[Boundary]) -> ReviewOutcome:
        outcome = ReviewOutcome()
        if not boundaries:
            return outcome
        deadline = time.monotonic() + self.chunk_seconds
        budget_left = True

        def judge(boundary: Boundary) -> tuple[str, ReviewVerdict | None]:
            nonlocal budget_left
            if not budget_left or time.monotonic() > deadline:
                return boundary.key, None
            if not self.reserve():
                budget_left = False
                return boundary.key, None
            try:
                return boundary.key, ask(boundary, self.endpoint, client)
            except ReviewUnavailable as exc:
                log.warning("grouping review: boundary before %s kept: %s", boundary.key, exc)
                return boundary.key, None

        with httpx.Client(timeout=httpx.Timeout(self.endpoint.timeout)) as client, \
                ThreadPoolExecutor(max_workers=max(1, self.parallel),
                                   thread_name_prefix="grouping-review") as pool:
            for key, verdict in pool.map(judge, boundaries):
                if verdict is None:
                    continue
                merges = verdict.continues and verdict.confidence >= self.confidence
                outcome.verdicts[key] = merges
                outcome.reviewed += 1
                outcome.merged += merges
        return outcome
