"""teleconsultation: consult and consult_answer (issue 14)

A consult names its study by Study Instance UID (primary data, like reports: ``pacs reindex`` never orphans
it). ``ix_consult_grant`` serves the access condition every read path adds (pacs.consults.grants).

Revision ID: 0011_consults
Revises: 0010
Create Date: 2026-12-06 23:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011_consults'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('consult',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('study_facility', sa.String(length=64), nullable=False),
    sa.Column('requested_by', sa.String(length=128), nullable=False),
    sa.Column('requested_by_name', sa.String(length=128), nullable=False),
    sa.Column('requesting_facility', sa.String(length=64), nullable=False),
    sa.Column('consulted_facility', sa.String(length=64), nullable=False),
    sa.Column('external', sa.Boolean(), nullable=False),
    sa.Column('share_link_id', sa.Integer(), nullable=True),
    sa.Column('question', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('answered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('closed_by', sa.String(length=128), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('events_for_requester', sa.Integer(), nullable=False),
    sa.Column('requester_seen', sa.Integer(), nullable=False),
    sa.Column('requester_read_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('events_for_consultant', sa.Integer(), nullable=False),
    sa.Column('consultant_seen', sa.Integer(), nullable=False),
    sa.Column('consultant_read_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consult', schema=None) as batch_op:
        batch_op.create_index('ix_consult_grant', ['study_instance_uid', 'consulted_facility', 'state',
                                                   'expires_at'], unique=False)
        batch_op.create_index('ix_consult_inbox', ['consulted_facility', 'state', 'id'], unique=False)
        batch_op.create_index('ix_consult_sent', ['requesting_facility', 'state', 'id'], unique=False)
        batch_op.create_index('ix_consult_due', ['state', 'expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_consult_requested_by'), ['requested_by'], unique=False)

    op.create_table('consult_answer',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('consult_fk', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('author', sa.String(length=256), nullable=False),
    sa.Column('author_name', sa.String(length=256), nullable=False),
    sa.Column('author_facility', sa.String(length=64), nullable=False),
    sa.Column('share_link_id', sa.Integer(), nullable=True),
    sa.Column('report_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['consult_fk'], ['consult.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('consult_answer', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consult_answer_consult_fk'), ['consult_fk'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('consult_answer', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consult_answer_consult_fk'))
    op.drop_table('consult_answer')
    with op.batch_alter_table('consult', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consult_requested_by'))
        batch_op.drop_index('ix_consult_due')
        batch_op.drop_index('ix_consult_sent')
        batch_op.drop_index('ix_consult_inbox')
        batch_op.drop_index('ix_consult_grant')
    op.drop_table('consult')
