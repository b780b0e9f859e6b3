"""study-UID squatting: the reconciliation queue; study.provisional

``reconciliation_item`` holds objects received and kept but not filed into the study they name
(pacs.reconciliation). ``study.provisional`` marks a study created by an unregistered sender: a trusted
facility's exam with the same Study Instance UID claims it (pacs.ingest). Existing studies are not
provisional (who sent them first is not known any more).

Revision ID: 0009_reconciliation
Revises: 0008
Create Date: 2026-12-06 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009_reconciliation'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('reconciliation_item',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('facility', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('expected_patient_id', sa.String(length=64), nullable=False),
    sa.Column('expected_issuer_of_patient_id', sa.String(length=64), nullable=False),
    sa.Column('object_key', sa.String(length=400), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('transport', sa.String(length=16), nullable=False),
    sa.Column('source_ae', sa.String(length=16), nullable=False),
    sa.Column('source_address', sa.String(length=64), nullable=False),
    sa.Column('source_user', sa.String(length=128), nullable=False),
    sa.Column('source_facility', sa.String(length=64), nullable=False),
    sa.Column('source_trusted', sa.Boolean(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('resolved_by', sa.String(length=128), nullable=False),
    sa.Column('resolution_note', sa.Text(), nullable=False),
    sa.Column('resolved_study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reconciliation_item', schema=None) as batch_op:
        batch_op.create_index('ix_reconciliation_item_queue', ['facility', 'state', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reconciliation_item_study_instance_uid'), ['study_instance_uid'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_reconciliation_item_sop_instance_uid'), ['sop_instance_uid'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_reconciliation_item_sha256'), ['sha256'], unique=False)

    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('provisional', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('provisional')
    op.drop_table('reconciliation_item')
