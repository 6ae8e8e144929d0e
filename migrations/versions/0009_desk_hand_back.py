"""desk: hand-back links, first-response timers (issue 17).

Sessions remember a hand-back both ways (`handed_back_from` on the robot session that
resumed the conversation, `handed_back_to` on the one the desk completed). Transfers
keep the hand-back packet, when their first human answer came (`first_response_at`),
when the sweep must look at them (`first_response_due_at`, indexed: the sweep reads a
range of it and clears it) and when it flagged them overdue.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import app.db

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(length: int) -> sa.types.TypeEngine:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(collation="utf8mb4_bin", length=length), "mysql"
    )


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("handed_back_from", _id(40), nullable=True))
        batch.add_column(sa.Column("handed_back_to", _id(40), nullable=True))
    with op.batch_alter_table("session_transfers") as batch:
        batch.add_column(sa.Column("hand_back", sa.JSON().with_variant(mysql.JSON(), "mysql"),
                                   nullable=True))
        batch.add_column(sa.Column("first_response_at", app.db.UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("first_response_due_at", app.db.UTCDateTime(),
                                   nullable=True))
        batch.add_column(sa.Column("first_response_overdue_at", app.db.UTCDateTime(),
                                   nullable=True))
        batch.create_index("ix_transfers_first_response_due", ["first_response_due_at"],
                           unique=False)


def downgrade() -> None:
    with op.batch_alter_table("session_transfers") as batch:
        batch.drop_index("ix_transfers_first_response_due")
        batch.drop_column("first_response_overdue_at")
        batch.drop_column("first_response_due_at")
        batch.drop_column("first_response_at")
        batch.drop_column("hand_back")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("handed_back_to")
        batch.drop_column("handed_back_from")
