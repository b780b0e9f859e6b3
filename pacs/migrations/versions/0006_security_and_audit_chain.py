"""users, API tokens, study shares, facilities, hash-chained audit

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 09:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('app_user',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('password_hash', sa.String(length=256), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('full_name', sa.String(length=128), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('username')
    )
    op.create_table('api_token',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('images_granted', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('secret_sha256')
    )
    op.create_table('study_share',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('shared_by', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['study_fk'], ['study.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_fk', 'facility', name='uq_study_share')
    )
    with op.batch_alter_table('study_share', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_share_facility'), ['facility'], unique=False)
        batch_op.create_index(batch_op.f('ix_study_share_study_fk'), ['study_fk'], unique=False)
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('facility', sa.String(length=64), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_study_facility'), ['facility'], unique=False)
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.add_column(sa.Column('facility', sa.String(length=64), nullable=False, server_default=''))
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('entry_hash', sa.String(length=64), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('audit_event', schema=None) as batch_op:
        batch_op.drop_column('entry_hash')
        batch_op.drop_column('prev_hash')
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.drop_column('facility')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_study_facility'))
        batch_op.drop_column('facility')
    op.drop_table('study_share')
    op.drop_table('api_token')
    op.drop_table('app_user')
