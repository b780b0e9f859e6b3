"""AE identity: TLS client certificate bound to an AE title; (AE title, address) pairs seen calling

Existing AEs keep their ``check_host`` as it was (``pacs ae list`` and ``pacs check`` flag those checked
neither by host nor by certificate); ``pacs ae add`` checks the host of new ones unless told not to.

Revision ID: 0009_ae_identity
Revises: 0008
Create Date: 2026-12-06 18:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0009_ae_identity'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tls_subject', sa.String(length=255), nullable=False, server_default=''))

    op.create_table('ae_sighting',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('first_seen', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ae_title', 'address', name='uq_ae_sighting')
    )


def downgrade() -> None:
    op.drop_table('ae_sighting')
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.drop_column('tls_subject')
