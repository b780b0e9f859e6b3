"""reports, study claims, key images, HL7 outbound queue; RIS fields on orders

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 05:20:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('imaging_order', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.String(length=8), nullable=False, server_default='ROUTINE'))
        batch_op.add_column(sa.Column('priority_rank', sa.Integer(), nullable=False, server_default='2'))
        batch_op.add_column(sa.Column('reason', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('facility', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False,
                                      server_default=''))
        batch_op.add_column(sa.Column('placer_order_number', sa.String(length=64), nullable=False,
                                      server_default=''))
        batch_op.add_column(sa.Column('source', sa.String(length=16), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('linked_study_instance_uid', sa.String(length=64), nullable=False,
                                      server_default=''))
        batch_op.create_index(batch_op.f('ix_imaging_order_facility'), ['facility'], unique=False)
        batch_op.create_index(batch_op.f('ix_imaging_order_linked_study_instance_uid'),
                              ['linked_study_instance_uid'], unique=False)
        batch_op.create_index('ix_imaging_order_priority', ['priority_rank', 'linked_study_instance_uid'],
                              unique=False)

    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.create_index('ix_study_created_at', ['created_at', 'id'], unique=False)

    op.create_table('report',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('current_version', sa.Integer(), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('report', schema=None) as batch_op:
        batch_op.create_index('ix_report_study_status', ['study_instance_uid', 'status'], unique=False)

    op.create_table('report_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('report_fk', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('findings', sa.Text(), nullable=False),
    sa.Column('impression', sa.Text(), nullable=False),
    sa.Column('language', sa.String(length=8), nullable=False),
    sa.Column('author', sa.String(length=128), nullable=False),
    sa.Column('author_name', sa.String(length=128), nullable=False),
    sa.Column('amend_reason', sa.Text(), nullable=False),
    sa.Column('preliminary_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('signed_by', sa.String(length=128), nullable=False),
    sa.Column('signed_by_name', sa.String(length=128), nullable=False),
    sa.Column('signed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('sr_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['report_fk'], ['report.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('report_fk', 'version', name='uq_report_version')
    )
    with op.batch_alter_table('report_version', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_report_version_report_fk'), ['report_fk'], unique=False)

    op.create_table('study_claim',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('claimed_by', sa.String(length=128), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_instance_uid')
    )

    op.create_table('key_image_selection',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('kos_sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('kos_series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('instances_json', sa.Text(), nullable=False),
    sa.Column('created_by', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('kos_sop_instance_uid')
    )
    with op.batch_alter_table('key_image_selection', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_key_image_selection_study_instance_uid'), ['study_instance_uid'],
                              unique=False)

    op.create_table('hl7_outbound',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('message_type', sa.String(length=16), nullable=False),
    sa.Column('message_control_id', sa.String(length=64), nullable=False),
    sa.Column('report_fk', sa.Integer(), nullable=True),
    sa.Column('report_version', sa.Integer(), nullable=False),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ack_code', sa.String(length=4), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['report_fk'], ['report.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('destination', 'report_fk', 'report_version', name='uq_hl7_outbound'),
    sa.UniqueConstraint('message_control_id')
    )
    with op.batch_alter_table('hl7_outbound', schema=None) as batch_op:
        batch_op.create_index('ix_hl7_outbound_queue', ['state', 'next_attempt_at'], unique=False)


def downgrade() -> None:
    op.drop_table('hl7_outbound')
    op.drop_table('key_image_selection')
    op.drop_table('study_claim')
    op.drop_table('report_version')
    op.drop_table('report')
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_index('ix_study_created_at')
    with op.batch_alter_table('imaging_order', schema=None) as batch_op:
        batch_op.drop_index('ix_imaging_order_priority')
        batch_op.drop_index(batch_op.f('ix_imaging_order_linked_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_imaging_order_facility'))
        for column in ('linked_study_instance_uid', 'source', 'placer_order_number', 'issuer_of_patient_id',
                       'facility', 'reason', 'priority_rank', 'priority'):
            batch_op.drop_column(column)
