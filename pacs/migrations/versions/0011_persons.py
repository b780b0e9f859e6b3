"""one person, one record: persons, their national identifiers, and the patient record's link to its person

Revision ID: 0011_persons
Revises: 0010
Create Date: 2026-12-06 23:30:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = '0011_persons'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'person',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.Column('created_by', sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_table(
        'person_identifier',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('person_fk', sa.Integer(), nullable=False),
        sa.Column('system', sa.String(length=64), nullable=False),
        sa.Column('value', sa.String(length=64), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('(CURRENT_TIMESTAMP)'),
                  nullable=False),
        sa.ForeignKeyConstraint(['person_fk'], ['person.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('system', 'value', name='uq_person_identifier'),
    )
    with op.batch_alter_table('person_identifier', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_person_identifier_person_fk'), ['person_fk'], unique=False)
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.add_column(sa.Column('person_fk', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('national_ids', sa.String(length=512), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_patient_person_fk'), ['person_fk'], unique=False)
        batch_op.create_foreign_key('fk_patient_person_fk_person', 'person', ['person_fk'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('patient', schema=None) as batch_op:
        batch_op.drop_constraint('fk_patient_person_fk_person', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_patient_person_fk'))
        batch_op.drop_column('national_ids')
        batch_op.drop_column('person_fk')
    with op.batch_alter_table('person_identifier', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_person_identifier_person_fk'))
    op.drop_table('person_identifier')
    op.drop_table('person')
