"""The vocabulary of transfers (SPEC §3.6, §12): a transfer's status and what triggered it."""

from __future__ import annotations

from enum import StrEnum


class TransferStatus(StrEnum):
    PENDING = "PENDING"
    ACCEPTED = "ACCEPTED"
    COMPLETED = "COMPLETED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"


class TransferTrigger(StrEnum):
    ROBOT_REQUEST = "robot_request"
    KEYWORD = "keyword"
    LLM = "llm"
    ROBOT_FAILURE = "robot_failure"
    OPERATOR = "operator"
    HISTORY = "history"
