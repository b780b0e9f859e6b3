"""The PostgreSQL index: `pg_dump --format=custom` in a snapshot shared with the caller, and `pg_restore`.

The client programs are found on PATH, then in Debian's /usr/lib/postgresql/<major>/bin. A pg_dump older
than the server refuses to run, and pg_restore cannot read an archive written by a newer pg_dump: both are
checked first, with a message naming the package to install. The password goes to the programs through
PGPASSWORD, never on a command line that `ps` shows.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from pacs.backup.layout import BackupError, BackupRefused

T = TypeVar("T")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_DEBIAN_BIN = "/usr/lib/postgresql/*/bin"


@dataclass(frozen=True)
class PgTool:
    path: str
    version: str  # e.g. "15.20"

    @property
    def major(self) -> int:
        return major_of(self.version)


def major_of(version: str) -> int:
    return int(version.split(".")[0])


def _version_of(path: str) -> str | None:
    try:
        text_ = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION_RE.search(text_)
    return f"{match.group(1)}.{match.group(2) or 0}" if match else None


def find_tool(name: str, at_least: int) -> PgTool:
    """``name`` (pg_dump, pg_restore) of major version ``at_least`` or newer: PATH's first, else Debian's."""
    candidates = [p for p in [shutil.which(name)] if p]
    candidates += sorted(glob.glob(f"{_DEBIAN_BIN}/{name}"), key=lambda p: int(p.split("/")[-3]) if
                         p.split("/")[-3].isdigit() else 0)
    found: list[PgTool] = []
    for path in candidates:
        version = _version_of(path)
        if version is None:
            continue
        tool = PgTool(path, version)
        if tool.major >= at_least:
            return tool
        found.append(tool)
    package = f"postgresql-client-{at_least}"
    if not found:
        raise BackupRefused(f"{name} is not installed: install the PostgreSQL client programs of version "
                            f"{at_least} or newer (Debian/Ubuntu: apt-get install {package})")
    have = ", ".join(f"{t.path} ({t.version})" for t in found)
    raise BackupRefused(f"{name} must be of PostgreSQL {at_least} or newer, found only {have}: "
                        f"install {package} (PostgreSQL's apt repository has every version)")


def server_version(conn: Connection) -> str:
    number = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    return f"{number // 10000}.{number % 10000}"


def libpq_connection(engine: Engine) -> tuple[str, dict[str, str]]:
    """A libpq connection string (no password) and the environment that carries the password."""
    url = make_url(engine.url.render_as_string(hide_password=False))
    params: dict[str, str] = {}
    for name, value in (("host", url.host), ("port", url.port), ("dbname", url.database), ("user", url.username)):
        if value is not None and value != "":
            params[name] = str(value)
    for name, given in url.query.items():
        params[name] = given if isinstance(given, str) else given[-1]
    conninfo = " ".join(f"{name}='{_quote(value)}'" for name, value in params.items())
    env = {**os.environ, "PGCONNECT_TIMEOUT": os.environ.get("PGCONNECT_TIMEOUT", "10")}
    if url.password:
        env["PGPASSWORD"] = url.password
    return conninfo, env


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _run(tool: PgTool, args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([tool.path, *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise BackupError(f"{Path(tool.path).name} failed (exit {result.returncode}): {tail}")


def dump(engine: Engine, path: Path, read: Callable[[Connection], T]) -> tuple[T, dict[str, str]]:
    """Dump the index into ``path`` and call ``read`` on a connection that sees exactly what was dumped.

    One REPEATABLE READ transaction exports its snapshot and pg_dump imports it (``--snapshot``): the facts
    and the list of referenced objects read by ``read`` describe the dump, whatever commits meanwhile.
    """
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            version = server_version(conn)
            tool = find_tool("pg_dump", major_of(version))
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
            conninfo, env = libpq_connection(engine)
            _run(tool, ["--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}",
                        f"--file={path}", f"--dbname={conninfo}"], env)
            result = read(conn)
    return result, {"server_version": version, "pg_dump_version": tool.version, "pg_dump": tool.path}


def check_restore_tools(engine: Engine, index: dict[str, object]) -> PgTool:
    """The pg_restore to use for this backup into this server; :class:`BackupRefused` if none can."""
    made_by = str(index.get("pg_dump_version") or "0")
    source = str(index.get("server_version") or "0")
    with engine.connect() as conn:
        target = server_version(conn)
    if major_of(target) < major_of(source):
        raise BackupRefused(f"the backup comes from PostgreSQL {source}; the target server is {target}: "
                            "restore into a server of the same major version or newer")
    return find_tool("pg_restore", major_of(made_by))  # reads archives of its own major and older


def restore(engine: Engine, path: Path, tool: PgTool) -> None:
    """Restore the dump into the (empty) database of ``engine``, all or nothing (one transaction)."""
    conninfo, env = libpq_connection(engine)
    _run(tool, ["--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
                f"--dbname={conninfo}", str(path)], env)
    # pg_restore leaves the planner without statistics until autovacuum comes by: queries of a large index
    # would start on bad plans
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
