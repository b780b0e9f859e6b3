"""merge the results-without-film branches (issue 14): share links, teleconsultations, persons

Revision ID: 0012
Revises: 0011_consults, 0011_persons, 0011_share_links
Create Date: 2026-12-07 00:30:00
"""

revision = '0012'
down_revision = ('0011_consults', '0011_persons', '0011_share_links')
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
