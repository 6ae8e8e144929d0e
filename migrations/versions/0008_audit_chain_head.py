"""audit: each session's chain head anchored on its row (issue 18); retention marks.

- `sessions.audit_head`: the hash of the session's last audit row, written in the
  same transaction as every audit row, so that verification sees a deleted last row
  (SPEC §7). Existing sessions are backfilled from their last row.
- `retention_marks`: how far a purge has deleted a table's id prefix (the events
  feed answers 410 for a cursor below it, SPEC §6).
- `webhook_deliveries.event_pk` no longer references `events`: events are kept
  `EVENTS_RETENTION` (7 d), deliveries `DELIVERIES_RETENTION` (30 d), so a delivery
  outlives its event; `redelivered_at`/`redelivered_by` record an operator's last
  redelivery of a given-up delivery (SPEC §13).

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import app.db

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DELIVERY_EVENT_FK = "fk_webhook_deliveries_event_pk_events"


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch_op:
        batch_op.add_column(sa.Column("audit_head", sa.String(length=64), nullable=True))
    # Backfill: the row hash of each session's last audit row (portable correlated form).
    op.execute(
        "UPDATE sessions SET audit_head = ("
        " SELECT o.row_hash FROM session_operations o WHERE o.id = ("
        "  SELECT MAX(o2.id) FROM session_operations o2 WHERE o2.session_pk = sessions.id))"
    )

    op.create_table(
        "retention_marks",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("purged_through", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", app.db.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_retention_marks")),
    )

    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.drop_constraint(DELIVERY_EVENT_FK, type_="foreignkey")
        batch_op.add_column(sa.Column("redelivered_at", app.db.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("redelivered_by", sa.String(length=128), nullable=True))


def downgrade() -> None:
    # The old foreign key cannot hold deliveries whose event was purged: they go.
    op.execute("DELETE FROM webhook_attempts WHERE delivery_pk IN (SELECT d.id FROM"
               " webhook_deliveries d WHERE NOT EXISTS"
               " (SELECT 1 FROM events e WHERE e.id = d.event_pk))")
    if op.get_bind().dialect.name == "mysql":
        op.execute("DELETE d FROM webhook_deliveries d LEFT JOIN events e"
                   " ON e.id = d.event_pk WHERE e.id IS NULL")
    else:
        op.execute("DELETE FROM webhook_deliveries WHERE NOT EXISTS"
                   " (SELECT 1 FROM events e WHERE e.id = webhook_deliveries.event_pk)")
    with op.batch_alter_table("webhook_deliveries") as batch_op:
        batch_op.drop_column("redelivered_by")
        batch_op.drop_column("redelivered_at")
        batch_op.create_foreign_key(DELIVERY_EVENT_FK, "events", ["event_pk"], ["id"])
    op.drop_table("retention_marks")
    with op.batch_alter_table("sessions") as batch_op:
        batch_op.drop_column("audit_head")

