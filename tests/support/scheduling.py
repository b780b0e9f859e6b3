"""The order test modules are handed to the pytest-xdist workers: the longest first.

`make test` runs `--dist loadfile --no-loadscope-reorder` (scripts/test.sh): each module goes whole to one worker,
in collection order. With xdist's own reordering (by number of tests) the modules with few but long tests
(a route matrix, crash drills) came last and the whole run waited for them on one worker while the others idled.
Here the known-long modules come first (longest first), then every other module that starts servers, then the
unit-only modules: many short ones fill the end evenly. Tests keep their order within a module.
"""

from __future__ import annotations

import pytest

from tests.support.tiers import is_integration

# Measured on the 2-core CI machine (`--durations`, issue 10's work), longest first; worth refreshing from a
# full run's `--durations=60` when modules are added. A module missing here still runs: it is only
# scheduled with the other modules that start servers.
LONGEST_FIRST = (
    "test_crash_drills.py",
    "test_reindex_check.py",
    "test_worker_resilience.py",
    "test_study_deletion.py",
    "test_series_metadata.py",
    "test_ui_front.py",
    "test_ris_workflow.py",
    "test_ohif.py",
    "test_study_corrections.py",
    "test_stow.py",
    "test_ui_studies.py",
    "test_cli.py",  # ~40 % less CPU since its repeated commands run in-process (issue 10)
    "test_ui_admin.py",
    "test_api_fuzz.py",
    "test_forwarding.py",
    "test_retrieve.py",
    "test_study_transfers.py",
    "test_dicomweb_wado.py",
    "test_fhir_reports.py",
    "test_ui_reading.py",
    "test_ui_tech.py",
    "test_study_rejection.py",
)


def longest_modules_first(items: list[pytest.Item]) -> None:
    """Reorder ``items`` in place, module by module (a module's tests stay together and in order)."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)

    def rank(entry: tuple[int, str]) -> tuple[int, int]:
        position, path = entry
        name = path.rsplit("/", 1)[-1]
        if name in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(name)
        if any(is_integration(item) for item in modules[path]):
            return 1, position
        return 2, position

    order = sorted(enumerate(modules), key=rank)
    items[:] = [item for _, path in order for item in modules[path]]
