"""console log-ins kept on the server, so that logging out ends them (SPEC §13).

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

import app.db

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _id(length: int) -> sa.types.TypeEngine:
    return sa.String(length=length).with_variant(
        mysql.VARCHAR(collation="utf8mb4_bin", length=length), "mysql"
    )


def upgrade() -> None:
    op.create_table(
        "console_logins",
        sa.Column("login_id", _id(64), nullable=False),
        sa.Column("client_id", _id(40), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("expires_at", app.db.UTCDateTime(), nullable=False),
        sa.Column("ended_at", app.db.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"], ["api_clients.client_id"],
            name=op.f("fk_console_logins_client_id_api_clients"),
        ),
        sa.PrimaryKeyConstraint("login_id", name=op.f("pk_console_logins")),
    )
    with op.batch_alter_table("console_logins") as batch_op:
        batch_op.create_index("ix_console_logins_client_id", ["client_id"])
        batch_op.create_index("ix_console_logins_expires_at", ["expires_at"])


def downgrade() -> None:
    op.drop_table("console_logins")
