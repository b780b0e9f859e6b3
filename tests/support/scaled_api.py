"""The scaled configuration with its HTTP API, for end-to-end tests: `pacs scp` + `pacs worker` + `pacs api`
as real processes on a fresh PostgreSQL database, a fresh bucket of the suite's S3 server and Redis.

It has the same face as :class:`tests.support.pacs_process.EmbeddedPacs` (``port``, ``http_url``, ``env``,
``ctx``, ``token()``, ``close()``), so a test module can run the same tests against both::

    @pytest.fixture(scope="module", params=["embedded", "scaled"])
    def pacs(request, tmp_path_factory):
        root = tmp_path_factory.mktemp(request.param)
        server = (ScaledApi(root, request.getfixturevalue("s3_server")) if request.param == "scaled"
                  else EmbeddedPacs(root))
        yield server
        server.close()

Each stack gets its own Celery queue (``PACS_TASK_QUEUE``), so stacks of different test modules never
run each other's tasks on the shared Redis. ``stop_worker()`` / ``start_worker()`` make the derived work
fall behind on purpose.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from pacs.context import AppContext
from pacs.settings import Settings
from tests.conftest import REDIS_URL
from tests.support.http_api import create_token, wait_http
from tests.support.net import free_port
from tests.support.pacs_process import PacsProcess, run_pacs
from tests.support.postgres import create_database, drop_database
from tests.support.seaweed import SeaweedS3


class ScaledApi:
    def __init__(self, root: Path, s3: SeaweedS3, extra_env: dict[str, str] | None = None,
                 worker_concurrency: int = 1) -> None:
        self.root = root
        self.db_name, self.db_url = create_database()
        self.port = free_port()
        http_port = free_port()
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.env = {
            "PACS_DATA_DIR": str(root / "data"),
            "PACS_DATABASE_URL": self.db_url,
            "PACS_STORAGE_URL": s3.url_for(f"pacs-api-{uuid.uuid4().hex[:12]}"),
            "PACS_BROKER_URL": REDIS_URL,
            "PACS_TASK_QUEUE": f"pacs-test-{uuid.uuid4().hex[:12]}",
            "PACS_DICOM_PORT": str(self.port),
            "PACS_HTTP_PORT": str(http_port),
            "PACS_OUTBOX_POLL_S": "1",
            **(extra_env or {}),
        }
        self._concurrency = worker_concurrency
        self.processes: list[PacsProcess] = []
        self.worker: PacsProcess | None = None
        try:
            upgrade = run_pacs(["db", "upgrade"], self.env)
            assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
            self.start_worker()
            self.scp = self._start(["scp"], "scp.log")
            self.api = self._start(["api"], "api.log")
            self.scp.wait_dicom(self.port)
            self._wait_api()
        except BaseException:
            self._stop_all()
            drop_database(self.db_name)
            raise
        self.ctx = AppContext.create(Settings(database_url=self.db_url, storage_url=self.env["PACS_STORAGE_URL"],
                                              data_dir=root / "data"))

    def _start(self, args: list[str], log: str) -> PacsProcess:
        process = PacsProcess(args, self.env, self.root / log).start()
        self.processes.append(process)
        return process

    def _wait_api(self, timeout: float = 60) -> None:
        try:
            wait_http(self.http_url, timeout)
        except TimeoutError:
            raise RuntimeError(f"pacs api did not start:\n{self.api.log_tail()}") from None

    def start_worker(self) -> None:
        if self.worker is None or not self.worker.alive():
            self.worker = self._start(["worker", "--concurrency", str(self._concurrency)], "worker.log")

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.stop()

    def token(self, role: str, **kwargs: object) -> str:
        """A new API token for ``role`` (see tests.support.http_api.create_token)."""
        return create_token(self.env, role, **kwargs)  # type: ignore[arg-type]

    def logs(self) -> str:
        return "\n".join(f"--- {p.args[0]}\n{p.log_tail(40)}" for p in self.processes)

    def _stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def close(self) -> None:
        self._stop_all()
        self.ctx.close()
        drop_database(self.db_name)
