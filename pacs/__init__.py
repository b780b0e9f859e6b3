"""Filmless PACS/RIS core: settings, index, the one ingest service, the `pacs` command line."""

__version__ = "0.1.0"
