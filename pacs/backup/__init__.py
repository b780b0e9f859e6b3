"""Backups that restore: `pacs backup create|verify|restore` (deploy/backup.md is the operator's guide).

A backup is one folder (:mod:`pacs.backup.layout`): the index (a `pg_dump` archive or a SQLite copy), every
object of the store with a list of their sizes and SHA-256, and a manifest written last. Restoring needs an
empty index and an empty store and verifies the whole backup before it writes anything.
"""

from pacs.backup.create import CreateSummary, create_backup
from pacs.backup.layout import BackupDamaged, BackupError, BackupRefused
from pacs.backup.restore import RestoreSummary, restore_backup
from pacs.backup.verify import VerifySummary, verify_backup

__all__ = [
    "BackupDamaged",
    "BackupError",
    "BackupRefused",
    "CreateSummary",
    "RestoreSummary",
    "VerifySummary",
    "create_backup",
    "restore_backup",
    "verify_backup",
]
