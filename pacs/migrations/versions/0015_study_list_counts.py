"""study list counts: partial indexes of the studies a list shows, counted from the index alone (PostgreSQL)

Revision ID: 0015_study_list_counts
Revises: 0014_deleted_objects
Create Date: 2026-12-07 05:00:00

Every study list answers with its total (QIDO-RS ``X-Total-Count``, the study browser's pager), and a study
without images is never listed (``number_of_instances > 0``). At 10^7 instances (~800,000 studies,
``bench/index_scale.py``) counting the first page of the study browser read the whole study table (0.4–1.3 s on
2 cores); these indexes hold only the listed studies, with the facility (the access scope's condition) and the
id (a shared study's), so PostgreSQL counts from the index without visiting the table:

- ``ix_study_listed`` (facility, id): the whole archive's or one facility's list;
- ``ix_study_listed_date`` (study_date, facility, id): a date range (a month: ~7,000 studies, 400 ms -> 2 ms);
- ``ix_study_listed_patient`` (patient_fk, facility, id): a name search's studies.

SQLite (embedded mode) gets nothing: its archives are small.

The price, at ingest: the index predicate reads ``number_of_instances``, which every stored instance increments,
so those updates of the study row are no longer HOT (heap-only) — each one adds an entry to every index of
``study`` until autovacuum removes the old ones (measured on the 10^7 archive: 3,000 single-row updates, 0 HOT
instead of 85 %, 3.8 instead of 3.1 ms each with their commit).

Big existing sites: building them takes a few seconds per million studies, during which this plain
``CREATE INDEX`` blocks writes to ``study`` (ingest waits). To build them without blocking, run before
``pacs db upgrade`` (outside a transaction; psql runs each statement on its own)::

    CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_study_listed ON study (facility, id)
        WHERE number_of_instances > 0;
    CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_study_listed_date ON study (study_date, facility, id)
        WHERE number_of_instances > 0;
    CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_study_listed_patient ON study (patient_fk, facility, id)
        WHERE number_of_instances > 0;

This migration then finds them (``IF NOT EXISTS``) and only records the revision. (A failed concurrent build
leaves an INVALID index: ``DROP INDEX CONCURRENTLY`` it and run the statement again.) Index-only scans need
the visibility map, which autovacuum keeps; after a bulk import run ``VACUUM (ANALYZE) study``.
"""

from alembic import op

revision = '0015_study_list_counts'
down_revision = '0014_deleted_objects'
branch_labels = None
depends_on = None

INDEXES = [
    ('ix_study_listed', 'facility, id'),
    ('ix_study_listed_date', 'study_date, facility, id'),
    ('ix_study_listed_patient', 'patient_fk, facility, id'),
]


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, columns in INDEXES:
        op.execute(f'CREATE INDEX IF NOT EXISTS {name} ON study ({columns}) WHERE number_of_instances > 0')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    for name, _columns in INDEXES:
        op.execute(f'DROP INDEX IF EXISTS {name}')
