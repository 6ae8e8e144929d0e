"""import chunks: when their last run started; import jobs: when a stalled job was last
sent again (the beat's safety net for chunk tasks the broker lost).

Revision ID: 0012
Revises: 0011
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("import_chunks") as batch_op:
        batch_op.add_column(sa.Column("started_at", app.db.UTCDateTime(), nullable=True))
    with op.batch_alter_table("import_jobs") as batch_op:
        batch_op.add_column(sa.Column("resumed_at", app.db.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("import_jobs") as batch_op:
        batch_op.drop_column("resumed_at")
    with op.batch_alter_table("import_chunks") as batch_op:
        batch_op.drop_column("started_at")
