"""import jobs: the split's fencing token and heartbeat; chunks: their first error line.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("import_jobs") as batch_op:
        batch_op.add_column(sa.Column("split_token", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("split_heartbeat_at", app.db.UTCDateTime(),
                                      nullable=True))
    with op.batch_alter_table("import_chunks") as batch_op:
        batch_op.add_column(sa.Column("first_error_line", sa.Integer(), nullable=True))
        batch_op.create_index("ix_import_chunks_job_first_error",
                              ["job_pk", "first_error_line"])


def downgrade() -> None:
    with op.batch_alter_table("import_chunks") as batch_op:
        batch_op.drop_index("ix_import_chunks_job_first_error")
        batch_op.drop_column("first_error_line")
    with op.batch_alter_table("import_jobs") as batch_op:
        batch_op.drop_column("split_heartbeat_at")
        batch_op.drop_column("split_token")
