"""Jobs gain a heartbeat, a progress line and the process that runs them.

The controller renews `heartbeat_at` while a job's worker lives; a running job
whose heartbeat is older than the lease was left by a dead controller and is
recovered. `progress` is what `retort status` shows ("sft 120/375"); `process`
("host:pid") names the worker process, so an operator (or a test) can find it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("progress", sa.String(128), nullable=True))
        batch.add_column(sa.Column("process", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in ("process", "progress", "heartbeat_at"):
            batch.drop_column(column)
