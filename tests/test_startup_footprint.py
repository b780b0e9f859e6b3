"""A serving process does not load the libraries only some requests need (issue 13's memory goal).

fpdf with fontTools (~28 MB of resident memory per process), highdicom (~20 MB) and httpx (~5 MB) are loaded when a
PDF, a key-object or rejection note, or an OIDC sign-in is made, not when `pacs serve` starts and builds its HTTP
app: with them `pacs serve` idled at ~200 MB, without them at ~178 MB (bench/README.md). Checked in a fresh
interpreter, since the test process itself has loaded everything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import json, sys
from pacs.context import AppContext
from pacs.settings import Settings
from viewer_api.app import create_app
import pacs.runtime, pacs.ingest.service, dicom_scp.server  # what `pacs serve` runs besides the HTTP app
ctx = AppContext.create(Settings(data_dir=sys.argv[1], database_url="", storage_url="", broker_url=""))
create_app(ctx)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
ctx.close()
"""

_LOADED_ON_DEMAND = ("fpdf", "fontTools", "highdicom", "httpx")


def _top_level_modules_after_start(tmp_path: Path) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=120, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.integration  # a fresh interpreter: a process
def test_building_the_serving_process_loads_no_pdf_sr_or_http_client_library(tmp_path: Path) -> None:
    loaded = _top_level_modules_after_start(tmp_path)
    assert "fastapi" in loaded and "pynetdicom" in loaded  # the probe did build the process's parts
    assert sorted(set(_LOADED_ON_DEMAND) & loaded) == []


def test_report_time_zone_and_names_have_one_definition() -> None:
    """Moved out of the PDF builder for the above, and still what the PDF prints (its tests render PDFs)."""
    from datetime import UTC, datetime

    from pacs.reports.document import REPORT_TIMEZONE, display_name
    from pacs.reports.pdf import REPORT_TIMEZONE as PDF_TIMEZONE
    from pacs.reports.pdf import display_name as pdf_display_name

    assert PDF_TIMEZONE is REPORT_TIMEZONE and pdf_display_name is display_name  # one definition, re-exported
    assert display_name("Nguyễn^Văn An") == "Nguyễn Văn An"
    assert datetime(2026, 12, 7, 17, 30, tzinfo=UTC).astimezone(REPORT_TIMEZONE).hour == 0  # UTC+7
