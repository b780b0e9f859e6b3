"""`pacs backup verify DIR`: every file of a backup against its manifest, every object read back and hashed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs.backup.layout import OBJECTS_LIST, REFERENCES_LIST, Manifest, read_manifest
from pacs.backup.objects import file_sha256, verify_objects
from pacs.maintenance import NoProgress, ProgressSink


@dataclass
class VerifySummary:
    manifest: Manifest
    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """Every file is as the manifest says (the backup can be restored)."""
        return not self.problems

    @property
    def missing_at_creation(self) -> int:
        """Objects the index referenced that the store did not hold (as indexed) when the backup was made."""
        return int(self.manifest.references["missing"])

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.manifest.folder), "intact": self.intact, "objects": self.objects,
                "bytes": self.bytes, "problems": self.problems, "missing_at_creation": self.missing_at_creation,
                "missing_keys": self.manifest.references.get("missing_keys", []),
                "created_at": self.manifest.data.get("created_at"), "index_kind": self.manifest.index_kind,
                "alembic_revisions": self.manifest.index["alembic_revisions"],
                "tables": self.manifest.index["tables"]}


def _check_file(folder: Path, name: str, size: int | None, sha256: str, problems: list[str],
                progress: ProgressSink) -> None:
    path = folder / name
    if not path.is_file():
        problems.append(f"{name} is missing")
        return
    actual_size, actual_sha = file_sha256(path, progress)
    if size is not None and actual_size != size:
        problems.append(f"{name}: {actual_size} bytes, the manifest says {size}")
    elif actual_sha != sha256:
        problems.append(f"{name}: SHA-256 differs from the manifest (changed or corrupt)")


def verify_backup(folder: Path, progress: ProgressSink | None = None) -> VerifySummary:
    """Check the backup in ``folder``; :class:`BackupRefused` if it is not a (complete) backup at all."""
    progress = progress or NoProgress()
    manifest = read_manifest(folder)
    summary = VerifySummary(manifest)
    problems = summary.problems
    progress.phase("index", 1)
    _check_file(folder, manifest.index_path.name, int(manifest.index["size"]), str(manifest.index["sha256"]),
                problems, progress)
    _check_file(folder, OBJECTS_LIST, None, str(manifest.objects["list_sha256"]), problems, progress)
    _check_file(folder, REFERENCES_LIST, None, str(manifest.references["list_sha256"]), problems, progress)
    progress.advance(1)
    progress.phase("verifying", int(manifest.objects["count"]))
    if (folder / OBJECTS_LIST).is_file():
        summary.objects, summary.bytes, object_problems = verify_objects(folder, progress)
        problems.extend(object_problems)
        if not object_problems and (summary.objects, summary.bytes) != (manifest.objects["count"],
                                                                        manifest.objects["bytes"]):
            problems.append(f"{summary.objects} objects of {summary.bytes} bytes, the manifest says "
                            f"{manifest.objects['count']} of {manifest.objects['bytes']}")
    return summary
