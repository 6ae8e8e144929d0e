"""Rows as the admin API and console show them (JSON-ready dictionaries)."""

from __future__ import annotations

from typing import Any

from app.audit.models import Operation
from app.clients.models import ApiClient
from app.messages.models import Message
from app.sessions.models import Session
from app.sessions.schemas import SessionView
from app.transfers.models import Transfer
from app.transfers.schemas import TransferView


def session_json(row: Session) -> dict[str, Any]:
    return SessionView.model_validate(row).model_dump(mode="json")


def transfer_json(row: Transfer) -> dict[str, Any]:
    return TransferView.model_validate(row).model_dump(mode="json", exclude={"history"})

def operation_json(row: Operation) -> dict[str, Any]:
    return {
        "id": row.id,
        "session_id": row.session_id,
        "operation": row.operation,
        "from_status": row.from_status,
        "to_status": row.to_status,
        "actor": row.actor,
        "reason": row.reason,
        "details": row.details,
        "created_at": row.created_at.isoformat(),
        "row_hash": row.row_hash,
    }


def message_json(row: Message) -> dict[str, Any]:
    return {
        "message_id": row.message_id,
        "sender_role": str(row.sender_role),
        "sender_id": row.sender_id,
        "content": row.content,
        "message_type": row.message_type,
        "sent_at": row.sent_at.isoformat(),
        "received_at": row.received_at.isoformat(),
        "posted_by": row.posted_by,
        "agent_id": row.agent_id,
        "import_job_id": row.import_job_id,
    }


def client_json(row: ApiClient) -> dict[str, Any]:
    return {
        "client_id": row.client_id,
        "name": row.name,
        "role": row.role,
        "token_prefix": row.token_prefix,
        "webhook_url": row.webhook_url,
        "created_at": row.created_at.isoformat(),
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "active": row.revoked_at is None,
    }
