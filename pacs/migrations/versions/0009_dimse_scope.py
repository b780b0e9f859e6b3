"""facility scope over DICOM: application_entity.archive_wide

Registered AEs now query, retrieve, see the worklist and get storage commitment only inside a scope
(pacs.ae_scope): their facility's studies, or every study when registered ``--archive-wide``. So that an
upgrade changes nothing for a site, every AE registered *without* a facility (which until now saw the whole
archive) is marked archive-wide here, and the upgrade logs how many: review them with ``pacs ae list`` and
re-register those that belong to one facility (``pacs ae remove`` + ``pacs ae add --facility``). AEs with a
facility keep it and from now on see only that facility's studies (and studies shared with it).

(The MPPS rule "N-SET only by the AE that did the N-CREATE" needs no column: the calling AE title of the
N-CREATE is in performed_procedure_step.calling_ae_title since 0003.)

Revision ID: 0009_dimse_scope
Revises: 0008
Create Date: 2026-12-06 18:00:00.000000
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = '0009_dimse_scope'
down_revision = '0008'
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")


def upgrade() -> None:
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.add_column(sa.Column('archive_wide', sa.Boolean(), nullable=False, server_default=sa.false()))
    marked = op.get_bind().execute(sa.text(
        "UPDATE application_entity SET archive_wide = :yes WHERE facility = ''"), {"yes": True}).rowcount
    if marked:
        log.warning("0009_dimse_scope: %d registered AE(s) without a facility marked archive-wide (they keep seeing "
                    "every facility's studies); review them with `pacs ae list`", marked)


def downgrade() -> None:
    with op.batch_alter_table('application_entity', schema=None) as batch_op:
        batch_op.drop_column('archive_wide')
