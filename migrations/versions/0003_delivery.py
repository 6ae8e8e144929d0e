"""delivery tables: webhook deliveries, attempts, fan-out cursors; detection marks.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import app.db

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(length: int) -> sa.types.TypeEngine:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(collation="utf8mb4_bin", length=length), "mysql"
    )


BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("delivery_id", _id(40), nullable=False),
        sa.Column("client_id", _id(40), nullable=False),
        sa.Column("event_pk", BIG_ID, nullable=False),
        sa.Column("session_id", _id(40), nullable=True),
        sa.Column("event_type", sa.String(length=48), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("created_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("delivered_at", app.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_pk"], ["events.id"], name=op.f("fk_webhook_deliveries_event_pk_events")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("delivery_id", name=op.f("uq_webhook_deliveries_delivery_id")),
        sa.UniqueConstraint("client_id", "event_pk", name="uq_webhook_deliveries_client_event"),
    )
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.create_index("ix_webhook_deliveries_queue", ["client_id", "status", "event_pk"])
        batch_op.create_index("ix_webhook_deliveries_status", ["status", "next_attempt_at"])

    op.create_table(
        "webhook_attempts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("delivery_pk", BIG_ID, nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(length=1024), nullable=False),
        sa.Column("attempted_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_pk"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_pk_webhook_deliveries"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    with op.batch_alter_table("webhook_attempts") as batch_op:
        batch_op.create_index("ix_webhook_attempts_delivery", ["delivery_pk", "id"])

    op.create_table(
        "webhook_cursors",
        sa.Column("client_id", _id(40), nullable=False),
        sa.Column("last_event_pk", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_webhook_cursors")),
    )

    op.create_table(
        "detection_marks",
        sa.Column("session_pk", BIG_ID, autoincrement=False, nullable=False),
        sa.Column("last_message_pk", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("session_pk", name=op.f("pk_detection_marks")),
    )


def downgrade() -> None:
    for table in ("detection_marks", "webhook_cursors", "webhook_attempts", "webhook_deliveries"):
        op.drop_table(table)
