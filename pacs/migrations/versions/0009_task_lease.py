"""derived-task leases: derived_task.owner and .crashes, the task_owner heartbeat table

A derived task that a process holds (queued in its in-process pool, or running) names that process in
``derived_task.owner``; each such process beats in ``task_owner``. The outbox relay's sweep puts the work of a
dead owner (its heartbeat older than PACS_TASK_LEASE_S, or, on the same host, its process gone) back at once,
instead of after PACS_TASK_REQUEUE_S; a task that was *running* when its owner died counts a crash, and after
PACS_TASK_MAX_CRASHES it is failed instead of run again (pacs.task_lease).

Revision ID: 0009_task_lease
Revises: 0008
Create Date: 2026-12-06 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009_task_lease'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('derived_task', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=160), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('crashes', sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'task_owner',
        sa.Column('id', sa.String(length=160), nullable=False),
        sa.Column('host', sa.String(length=128), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('started', sa.String(length=32), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )


def downgrade() -> None:
    op.drop_table('task_owner')
    with op.batch_alter_table('derived_task', schema=None) as batch_op:
        batch_op.drop_column('crashes')
        batch_op.drop_column('owner')
