"""patient accounts and tokens name the Issuer of Patient ID too (one patient record: ID, issuer, facility)

Revision ID: 0009_patient_binding
Revises: 0008
Create Date: 2026-12-06 17:55:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009_patient_binding'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ('app_user', 'api_token'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('patient_issuer', sa.String(length=64), nullable=False, server_default=''))


def downgrade() -> None:
    for table in ('app_user', 'api_token'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('patient_issuer')
