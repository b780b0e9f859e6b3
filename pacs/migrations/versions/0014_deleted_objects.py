"""deleted objects: tombstones of the store keys a deletion removes (a re-send of the same bytes keeps its object)

Revision ID: 0014_deleted_objects
Revises: 0013_rejections
Create Date: 2026-12-07 02:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0014_deleted_objects'
down_revision = '0013_rejections'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deleted_object',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('object_key', sa.String(length=400), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('object_key')
    )
    with op.batch_alter_table('deleted_object', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deleted_object_created_at'), ['created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deleted_object', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deleted_object_created_at'))
    op.drop_table('deleted_object')
