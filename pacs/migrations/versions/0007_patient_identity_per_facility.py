"""patient identity includes the facility that sent it

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 10:40:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('facility', sa.String(length=64), nullable=False, server_default=''))
        batch_op.drop_constraint('uq_patient_identity', type_='unique')
        batch_op.create_unique_constraint('uq_patient_identity', ['patient_id', 'issuer_of_patient_id', 'facility'])


def downgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_constraint('uq_patient_identity', type_='unique')
        batch_op.create_unique_constraint('uq_patient_identity', ['patient_id', 'issuer_of_patient_id'])
        batch_op.drop_column('facility')
