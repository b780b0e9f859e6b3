"""merge the security and reliability branches (issue 12): DIMSE scope, AE identity, patient binding,
reconciliation queue, derived-task leases

Revision ID: 0010
Revises: 0009_ae_identity, 0009_dimse_scope, 0009_patient_binding, 0009_reconciliation, 0009_task_lease
Create Date: 2026-12-06 19:30:00
"""

revision = '0010'
down_revision = ('0009_ae_identity', '0009_dimse_scope', '0009_patient_binding', '0009_reconciliation',
                 '0009_task_lease')
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
