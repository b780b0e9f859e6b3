"""RIS orders and modality performed procedure steps

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('imaging_order',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('patient_name_search', sa.String(length=324), nullable=False),
    sa.Column('patient_birth_date', sa.String(length=8), nullable=False),
    sa.Column('patient_sex', sa.String(length=16), nullable=False),
    sa.Column('requested_procedure_id', sa.String(length=16), nullable=False),
    sa.Column('requested_procedure_description', sa.String(length=64), nullable=False),
    sa.Column('scheduled_procedure_step_id', sa.String(length=16), nullable=False),
    sa.Column('scheduled_station_ae_title', sa.String(length=16), nullable=False),
    sa.Column('scheduled_start_date', sa.String(length=8), nullable=False),
    sa.Column('scheduled_start_time', sa.String(length=16), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('scheduled_performing_physician_name', sa.String(length=324), nullable=False),
    sa.Column('scheduled_performing_physician_name_search', sa.String(length=324), nullable=False),
    sa.Column('referring_physician_name', sa.String(length=324), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('accession_number'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('imaging_order', schema=None) as batch_op:
        batch_op.create_index('ix_imaging_order_worklist', ['state', 'scheduled_station_ae_title',
                                                            'scheduled_start_date'], unique=False)
        batch_op.create_index(batch_op.f('ix_imaging_order_patient_id'), ['patient_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_imaging_order_patient_name_search'), ['patient_name_search'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_imaging_order_requested_procedure_id'), ['requested_procedure_id'],
                              unique=False)

    op.create_table('performed_procedure_step',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('order_fk', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('performed_procedure_step_id', sa.String(length=16), nullable=False),
    sa.Column('performed_station_ae_title', sa.String(length=16), nullable=False),
    sa.Column('calling_ae_title', sa.String(length=16), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('start_date', sa.String(length=8), nullable=False),
    sa.Column('start_time', sa.String(length=16), nullable=False),
    sa.Column('end_date', sa.String(length=8), nullable=False),
    sa.Column('end_time', sa.String(length=16), nullable=False),
    sa.Column('n_create_json', sa.Text(), nullable=False),
    sa.Column('n_set_json', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['order_fk'], ['imaging_order.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('performed_procedure_step', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_performed_procedure_step_order_fk'), ['order_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_performed_procedure_step_study_instance_uid'), ['study_instance_uid'],
                              unique=False)

    op.create_table('performed_series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('step_fk', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_description', sa.String(length=64), nullable=False),
    sa.Column('number_of_images', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['step_fk'], ['performed_procedure_step.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('step_fk', 'series_instance_uid', name='uq_performed_series')
    )
    with op.batch_alter_table('performed_series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_performed_series_series_instance_uid'), ['series_instance_uid'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('performed_series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_performed_series_series_instance_uid'))

    op.drop_table('performed_series')
    with op.batch_alter_table('performed_procedure_step', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_performed_procedure_step_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_performed_procedure_step_order_fk'))

    op.drop_table('performed_procedure_step')
    with op.batch_alter_table('imaging_order', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_imaging_order_requested_procedure_id'))
        batch_op.drop_index(batch_op.f('ix_imaging_order_patient_name_search'))
        batch_op.drop_index(batch_op.f('ix_imaging_order_patient_id'))
        batch_op.drop_index('ix_imaging_order_worklist')

    op.drop_table('imaging_order')
