"""imports tables: jobs, the staged upload, chunks and their staged rows, slot marks.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import app.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(mysql.JSON(), "mysql")
Blob = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql")


def IdStr(length: int) -> sa.types.TypeEngine:
    return sa.String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql")


def upgrade() -> None:
    op.create_table(
        "import_jobs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", IdStr(40), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("filename", sa.String(255), nullable=True),
        sa.Column("format", sa.String(8), nullable=True),
        sa.Column("encoding", sa.String(16), nullable=True),
        sa.Column("compression", sa.String(8), nullable=True),
        sa.Column("size_bytes", BigId, nullable=False),
        sa.Column("upload_parts", sa.Integer(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("total_rows", sa.Integer(), nullable=True),
        sa.Column("staged_rows", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("prepare_invalid", sa.Integer(), nullable=False),
        sa.Column("prepare_errors", Json, nullable=True),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("inserted", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("sessions_created", sa.Integer(), nullable=False),
        sa.Column("sessions_updated", sa.Integer(), nullable=False),
        sa.Column("conflicts", sa.Integer(), nullable=False),
        sa.Column("errors", Json, nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("started_at", app.db.UTCDateTime(), nullable=True),
        sa.Column("finished_at", app.db.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_jobs")),
        sa.UniqueConstraint("job_id", name=op.f("uq_import_jobs_job_id")),
    )
    op.create_index("ix_import_jobs_created", "import_jobs", ["created_at"])

    op.create_table(
        "import_upload_parts",
        sa.Column("job_pk", BigId, nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", Blob, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["import_jobs.id"],
            ondelete="CASCADE",
            name=op.f("fk_import_upload_parts_job_pk_import_jobs"),
        ),
        sa.PrimaryKeyConstraint("job_pk", "seq", name=op.f("pk_import_upload_parts")),
    )

    op.create_table(
        "import_chunks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_pk", BigId, nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("inserted", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("invalid", sa.Integer(), nullable=False),
        sa.Column("sessions_created", sa.Integer(), nullable=False),
        sa.Column("sessions_updated", sa.Integer(), nullable=False),
        sa.Column("conflicts", sa.Integer(), nullable=False),
        sa.Column("errors", Json, nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("done_at", app.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["import_jobs.id"],
            ondelete="CASCADE",
            name=op.f("fk_import_chunks_job_pk_import_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_chunks")),
        sa.UniqueConstraint("job_pk", "bucket", name="uq_import_chunks_job_bucket"),
    )
    op.create_index("ix_import_chunks_job_status", "import_chunks", ["job_pk", "status"])

    op.create_table(
        "import_chunk_parts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("job_pk", BigId, nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("payload", Blob, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_pk"],
            ["import_jobs.id"],
            ondelete="CASCADE",
            name=op.f("fk_import_chunk_parts_job_pk_import_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_chunk_parts")),
    )
    op.create_index(
        "ix_import_chunk_parts_bucket", "import_chunk_parts", ["job_pk", "bucket", "seq"]
    )

    op.create_table(
        "import_slot_marks",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("chunk_pk", BigId, nullable=False),
        sa.Column("account_id", IdStr(64), nullable=False),
        sa.Column("shop_id", IdStr(64), nullable=False),
        sa.Column("counts", Json, nullable=False),
        sa.ForeignKeyConstraint(
            ["chunk_pk"],
            ["import_chunks.id"],
            ondelete="CASCADE",
            name=op.f("fk_import_slot_marks_chunk_pk_import_chunks"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_import_slot_marks")),
        sa.UniqueConstraint("chunk_pk", "account_id", "shop_id", name="uq_import_slot_marks_slot"),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes; dropping an index first fails on MySQL when a
    # foreign key needs it.
    for table in (
        "import_slot_marks",
        "import_chunk_parts",
        "import_chunks",
        "import_upload_parts",
        "import_jobs",
    ):
        op.drop_table(table)
