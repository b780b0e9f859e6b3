"""rejections (IHE IOCM): rejected instances leave ``instance`` for ``rejected_instance``; rejection notes

Revision ID: 0013_rejections
Revises: 0012
Create Date: 2026-12-07 01:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0013_rejections'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rejected_instance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('note_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('object_key', sa.String(length=400), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('snapshot', sa.Text(), nullable=False),
    sa.Column('rejected_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('rejected_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('rejected_instance', schema=None) as batch_op:
        for column in ('series_instance_uid', 'study_instance_uid', 'facility', 'note_sop_instance_uid',
                       'rejected_at'):
            batch_op.create_index(batch_op.f(f'ix_rejected_instance_{column}'), [column], unique=False)
    op.create_table('rejection_note',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('object_key', sa.String(length=400), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('rejection_note', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rejection_note_study_instance_uid'), ['study_instance_uid'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('rejection_note', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rejection_note_study_instance_uid'))
    op.drop_table('rejection_note')
    with op.batch_alter_table('rejected_instance', schema=None) as batch_op:
        for column in ('series_instance_uid', 'study_instance_uid', 'facility', 'note_sop_instance_uid',
                       'rejected_at'):
            batch_op.drop_index(batch_op.f(f'ix_rejected_instance_{column}'))
    op.drop_table('rejected_instance')
