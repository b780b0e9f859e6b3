"""storage commitment transactions

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-01 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('storage_commitment',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('requesting_ae', sa.String(length=16), nullable=False),
    sa.Column('requesting_address', sa.String(length=64), nullable=False),
    sa.Column('requested_refs', sa.Text(), nullable=False),
    sa.Column('result', sa.Text(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('transaction_uid')
    )
    with op.batch_alter_table('storage_commitment', schema=None) as batch_op:
        batch_op.create_index('ix_storage_commitment_due', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('storage_commitment', schema=None) as batch_op:
        batch_op.drop_index('ix_storage_commitment_due')

    op.drop_table('storage_commitment')
