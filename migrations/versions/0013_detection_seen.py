"""detection marks: how many counterpart messages of the session the last run had
judged (the beat's safety net compares it with `sessions.counterpart_message_count`
to find sessions whose detection task was lost). Existing marks start at the
session's count: what they judged is not known any better, and it spares every live
session a detection run at the upgrade.

Revision ID: 0013
Revises: 0012
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("detection_marks") as batch_op:
        batch_op.add_column(sa.Column("counterpart_seen", sa.Integer(), nullable=False,
                                      server_default="0"))
    op.execute(
        "UPDATE detection_marks SET counterpart_seen = COALESCE((SELECT "
        "sessions.counterpart_message_count FROM sessions "
        "WHERE sessions.id = detection_marks.session_pk), 0)")


def downgrade() -> None:
    with op.batch_alter_table("detection_marks") as batch_op:
        batch_op.drop_column("counterpart_seen")
