"""imports: line-aligned parts of a big NDJSON upload, each split by a task of its own.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import app.db

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(mysql.JSON(), "mysql")


def upgrade() -> None:
    op.create_table(
        "import_split_parts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_pk", BigId, nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("start_byte", BigId, nullable=False),
        sa.Column("end_byte", BigId, nullable=False),
        sa.Column("first_line", sa.Integer(), nullable=False),
        sa.Column("buckets", sa.Integer(), nullable=False),
        sa.Column("clean", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=40), nullable=True),
        sa.Column("heartbeat_at", app.db.UTCDateTime(), nullable=True),
        sa.Column("staged_rows", sa.Integer(), nullable=False),
        sa.Column("records", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("errors", Json, nullable=True),
        sa.Column("rows_per_bucket", Json, nullable=True),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["import_jobs.id"],
            ondelete="CASCADE",
            name=op.f("fk_import_split_parts_job_pk_import_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_split_parts")),
        sa.UniqueConstraint("job_pk", "part", name="uq_import_split_parts_part"),
    )


def downgrade() -> None:
    op.drop_table("import_split_parts")
