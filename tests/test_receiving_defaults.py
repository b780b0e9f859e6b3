"""How many DICOM receiving processes `pacs serve` / `pacs scp` start when nobody says (PACS_DICOM_PROCESSES=0):
one per core this process may use, a container's CPU limit included, up to 4."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs import receiving_processes
from pacs.receiving_processes import default_processes, effective_processes
from pacs.settings import Settings


@pytest.fixture()
def cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No cgroup CPU limit unless a test writes one."""
    monkeypatch.setattr(receiving_processes, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    return monkeypatch


def _affinity(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(receiving_processes.os, "sched_getaffinity", lambda _pid: set(range(n)))


@pytest.mark.parametrize(("usable", "expected"), [(1, 1), (2, 2), (3, 3), (4, 4), (16, 4), (128, 4)])
def test_one_per_usable_core_up_to_four(cores: pytest.MonkeyPatch, usable: int, expected: int) -> None:
    _affinity(cores, usable)
    assert default_processes() == expected


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("150000 100000\n", 2),  # a limit of 1.5 CPUs: 2 processes
    ("100000 100000\n", 1),
    ("50000 100000\n", 1),  # under one CPU: still one
    ("300000 100000\n", 3),
    ("max 100000\n", 4),  # no limit: the affinity's 16 cores, capped
    ("garbled\n", 4),  # a line we do not know: as if there were none
])
def test_a_containers_cpu_limit_counts(cores: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str,
                                       expected: int) -> None:
    _affinity(cores, 16)
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert default_processes() == expected


def test_a_number_set_is_kept(cores: pytest.MonkeyPatch) -> None:
    _affinity(cores, 2)
    assert effective_processes(Settings(dicom_processes=1)) == 1
    assert effective_processes(Settings(dicom_processes=6)) == 6
    assert effective_processes(Settings(dicom_processes=0)) == 2
