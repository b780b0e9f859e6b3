"""The `pacs` command line."""
