"""Bulk import of a folder or zip of DICOM files through the one ingest function."""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pacs.ingest.outcome import IngestOutcome, IngestStatus
from pacs.ingest.service import Ingestor
from pacs.ingest.source import IngestSource


@dataclass(frozen=True)
class ImportItem:
    name: str
    size: int
    zip_path: Path | None = None


@dataclass
class ImportSummary:
    counts: Counter[str] = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)  # transient failures: import again

    def add(self, name: str, outcome: IngestOutcome) -> None:
        self.counts[outcome.status.value] += 1
        if outcome.status is IngestStatus.REJECTED:
            self.rejected.append((name, outcome.message))
        elif not outcome.ok:
            self.failed.append((name, outcome.message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def collect(path: Path) -> list[ImportItem]:
    """The files to import, with sizes (for the progress bar): a folder walked, or a zip's members."""
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [ImportItem(i.filename, i.file_size, path) for i in zf.infolist() if not i.is_dir()]
    if path.is_file():
        return [ImportItem(str(path), path.stat().st_size)]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a folder nor a file")
    items = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = Path(folder, name)
            if full.is_file() and not full.is_symlink():
                items.append(ImportItem(str(full), full.stat().st_size))
    return items


def import_items(ingestor: Ingestor, items: list[ImportItem], max_bytes: int,
                 user: str = "") -> Iterator[tuple[ImportItem, IngestOutcome]]:
    """Ingest each item in turn; yields its outcome. One file in memory at a time."""
    source = IngestSource("import", user=user or os.environ.get("USER", ""), address="local")
    open_zips: dict[Path, zipfile.ZipFile] = {}
    try:
        for item in items:
            if item.size > max_bytes:
                yield item, IngestOutcome(IngestStatus.REJECTED, f"file of {item.size} bytes exceeds {max_bytes}")
                continue
            if item.zip_path is not None:
                zf = open_zips.setdefault(item.zip_path, zipfile.ZipFile(item.zip_path))
                with zf.open(item.name) as fh:
                    data = fh.read(max_bytes + 1)  # a lying header cannot make this read unbounded
            else:
                data = Path(item.name).read_bytes()
            yield item, ingestor.ingest(data, source)
    finally:
        for zf in open_zips.values():
            zf.close()
