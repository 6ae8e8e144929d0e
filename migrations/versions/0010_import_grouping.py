"""imports: threads, reply chains, grouping options and review counts (issue 16).

Sessions record why an imported one starts where it starts (`started_by`: thread,
reply, gap, review) and the source's conversation key (`thread_id`, looked up when a
later upload continues the thread). Jobs record their grouping options and what the
LLM review did; chunks carry their share of the review counts until the job closes.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(length: int) -> sa.types.TypeEngine:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(collation="utf8mb4_bin", length=length), "mysql"
    )


def _count(name: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), nullable=False, server_default="0")


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("started_by", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("thread_id", _id(128), nullable=True))
        batch.create_index("ix_sessions_slot_thread", ["account_id", "shop_id", "thread_id"])
    with op.batch_alter_table("import_jobs") as batch:
        batch.add_column(sa.Column("session_gap", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("grouping", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("review", sa.Boolean(), nullable=True))
        batch.add_column(_count("review_calls"))
        batch.add_column(_count("boundaries_reviewed"))
        batch.add_column(_count("boundaries_merged"))
    with op.batch_alter_table("import_chunks") as batch:
        batch.add_column(_count("boundaries_reviewed"))
        batch.add_column(_count("boundaries_merged"))


def downgrade() -> None:
    with op.batch_alter_table("import_chunks") as batch:
        batch.drop_column("boundaries_merged")
        batch.drop_column("boundaries_reviewed")
    with op.batch_alter_table("import_jobs") as batch:
        batch.drop_column("boundaries_merged")
        batch.drop_column("boundaries_reviewed")
        batch.drop_column("review_calls")
        batch.drop_column("review")
        batch.drop_column("grouping")
        batch.drop_column("session_gap")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_index("ix_sessions_slot_thread")
        batch.drop_column("thread_id")
        batch.drop_column("started_by")
