"""sessions: operator merge and split (issue 16).

`merged_into`: the session this one was merged into (it keeps its terminal status and
no messages); `split_from`: the session this one was cut from. Public session ids,
like the other links (`preempted_by`, `interrupted_session_id`); no index: nothing
searches by them (the reverse links are in the audit trail of the session they name).

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(length: int) -> sa.types.TypeEngine:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(collation="utf8mb4_bin", length=length), "mysql"
    )


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("merged_into", _id(40), nullable=True))
        batch.add_column(sa.Column("split_from", _id(40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("split_from")
        batch.drop_column("merged_into")
