"""The machine and versions every benchmark prints before its figures."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
from datetime import datetime
from pathlib import Path

import psutil
from rich.table import Table


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_table() -> Table:
    """Date, host, CPU, memory and load, Python and our main libraries; callers add their own rows."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    table = Table(title="Environment", show_header=False)
    table.add_row("date", datetime.now().astimezone().isoformat(timespec="seconds"))
    table.add_row("host", f"{platform.node()} {platform.system()} {platform.release()}")
    table.add_row("CPU", f"{os.cpu_count()} logical CPUs ({psutil.cpu_count(logical=False)} physical), {cpu_model}")
    table.add_row("memory", f"{psutil.virtual_memory().total / 2**30:.1f} GiB; load average "
                            + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    table.add_row("python / filmless-pacs / pynetdicom / pydicom",
                  f"{platform.python_version()} / {package_version('filmless-pacs')} / "
                  f"{package_version('pynetdicom')} / {package_version('pydicom')}")
    return table
