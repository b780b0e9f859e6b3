"""query indexes: LIKE-prefix (wildcard) matching on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

The plain B-tree indexes of 0001 already cover equality on every common C-FIND/QIDO key
(PatientID, folded PatientName, StudyDate, AccessionNumber, the UIDs, the foreign keys). On
PostgreSQL a B-tree serves ``LIKE 'ABC%'`` only under the C collation; production databases
usually have a linguistic one (en_US.UTF-8, ICU), where ``PatientName=NGUYEN*`` (and the implicit
``NGUYEN^%`` of a family-name-only PN query) would scan the table. ``text_pattern_ops`` indexes
serve both ``=`` and prefix ``LIKE`` whatever the collation. SQLite (embedded mode) gets nothing:
its LIKE is case-insensitive and cannot use these indexes anyway, and embedded indexes are small.
"""

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

PATTERN_INDEXES = [
    ('ix_patient_patient_id_pattern', 'patient', 'patient_id'),
    ('ix_patient_patient_name_search_pattern', 'patient', 'patient_name_search'),
    ('ix_study_accession_number_pattern', 'study', 'accession_number'),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, table, column in PATTERN_INDEXES:
        op.create_index(name, table, [column], postgresql_ops={column: 'text_pattern_ops'})


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, table, _column in PATTERN_INDEXES:
        op.drop_index(name, table_name=table)
