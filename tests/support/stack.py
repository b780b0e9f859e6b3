"""The archives the end-to-end tests run against, as real processes started the way an operator starts them.

- :class:`EmbeddedPacs`: `pacs serve` on its own data folder (SQLite, the filesystem store, in-process workers).
- :class:`ScaledStack`: `pacs scp`, `pacs worker` and `pacs api` on a fresh PostgreSQL database, an object store
  (normally a fresh bucket of the session's S3 server) and a broker, each process started by the test module
  that needs it (:func:`scaled_api` starts all three).

Both have the same face (``port``, ``http_url``, ``env``, ``ctx``, ``token()``, ``close()``, and are context
managers), so a module can run the same tests against both::

    @pytest.fixture(scope="module", params=["embedded", "scaled"])
    def pacs(request, tmp_path_factory):
        root = tmp_path_factory.mktemp(request.param)
        with (scaled_api(root, request.getfixturevalue("s3_server")) if request.param == "scaled"
              else EmbeddedPacs(root)) as server:
            yield server

``ctx`` is the test's own view of the same index and object store (read-only by convention). Each scaled stack
has its own Celery queue (``PACS_TASK_QUEUE``): stacks of different modules never run each other's tasks on
the shared Redis, and one without a worker leaves nothing behind (:meth:`ScaledStack.close` deletes its queue).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

import redis
from sqlalchemy.engine import make_url

from pacs.context import AppContext
from pacs.settings import Settings
from tests.support.fault_proxy import FaultProxy
from tests.support.http_api import wait_http
from tests.support.inprocess import new_token
from tests.support.net import free_port
from tests.support.pacs_process import PacsProcess
from tests.support.postgres import create_migrated_database, drop_database
from tests.support.seaweed import SeaweedS3

REDIS_URL = os.environ.get("PACS_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
RABBITMQ_URL = os.environ.get("PACS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def embedded_env(data_dir: Path) -> dict[str, str]:
    """`pacs serve`'s environment on ``data_dir`` with free ports (DICOM, HTTP, HL7) and a quick outbox."""
    return {"PACS_DATA_DIR": str(data_dir), "PACS_DICOM_PORT": str(free_port()),
            "PACS_HTTP_PORT": str(free_port()), "PACS_HL7_PORT": str(free_port()), "PACS_OUTBOX_POLL_S": "1"}


class _Closing:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class EmbeddedPacs(_Closing):
    """A running `pacs serve` on its own data folder, plus the test's own view of its index and store."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.env = {**embedded_env(root / "data"), **(extra_env or {})}
        self.port = int(self.env["PACS_DICOM_PORT"])
        self.http_url = f"http://127.0.0.1:{self.env['PACS_HTTP_PORT']}"
        self.proc = PacsProcess(["serve"], self.env, root / "serve.log").start()
        try:
            self.proc.wait_dicom(self.port)
            self.wait_http()
        except BaseException:
            self.proc.stop()
            raise
        # the same index and store as the process (a store URL in extra_env: an S3 store instead of data/objects)
        self.ctx = AppContext.create(Settings(data_dir=root / "data", storage_url=self.env.get("PACS_STORAGE_URL", "")))

    def restart(self) -> None:
        """Stop the process and start it again on the same data and ports (state must survive)."""
        self.proc.stop()
        self.proc = PacsProcess(["serve"], self.env, self.root / "serve.log").start()
        self.proc.wait_dicom(self.port)
        self.wait_http()

    def wait_http(self, timeout: float = 60) -> None:
        wait_http(self.http_url, timeout)

    def token(self, role: str, **kwargs: object) -> str:
        """A new API token for ``role``, made in-process as `pacs token create` makes it
        (tests.support.inprocess.new_token; tests.support.http_api.create_token runs the command itself)."""
        return new_token(self.ctx, role, **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.proc.stop()
        self.ctx.close()


class ScaledStack(_Closing):
    """A fresh PostgreSQL database (the newest schema: a copy of a migrated template, as `pacs db upgrade` leaves
    it) and the environment of the scaled processes; the processes themselves are started with :meth:`start_scp`,
    :meth:`start_worker`, :meth:`start_api`.

    ``db_proxy=True`` puts a :class:`~tests.support.fault_proxy.FaultProxy` between the processes and PostgreSQL
    (``ctx`` still reaches it directly) so a test can cut the index. ``broker_url=None`` runs without a broker.
    Processes are named (their log is ``root/<name>.log``, appended to across restarts).
    """

    def __init__(self, root: Path, storage_url: str, *, broker_url: str | None = REDIS_URL, db_proxy: bool = False,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.db_name, self.db_url = create_migrated_database()  # as `pacs db upgrade` leaves it
        self.db_proxy: FaultProxy | None = None
        self.processes: dict[str, PacsProcess] = {}
        self._ports: dict[str, int] = {}
        self._stopped: list[PacsProcess] = []
        self.broker_url, self.queue = broker_url, f"pacs-test-{uuid.uuid4().hex[:12]}"
        self.port = free_port()
        self.http_url = f"http://127.0.0.1:{free_port()}"
        try:
            process_db_url = self.db_url
            if db_proxy:
                url = make_url(self.db_url)
                self.db_proxy = FaultProxy(url.host or "127.0.0.1", url.port or 5432).start()
                process_db_url = url.set(host="127.0.0.1", port=self.db_proxy.port).render_as_string(
                    hide_password=False)
            self.env = {
                "PACS_DATA_DIR": str(root / "data"),
                "PACS_DATABASE_URL": process_db_url,
                "PACS_STORAGE_URL": storage_url,
                "PACS_DICOM_PORT": str(self.port),
                "PACS_HTTP_PORT": self.http_url.rsplit(":", 1)[1],
                "PACS_OUTBOX_POLL_S": "1",
                **({"PACS_BROKER_URL": broker_url, "PACS_TASK_QUEUE": self.queue} if broker_url else {}),
                **(extra_env or {}),
            }
            self.ctx = AppContext.create(Settings(database_url=self.db_url, storage_url=storage_url,
                                                  data_dir=root / "data"))
        except BaseException:
            self._release()
            raise

    # -- processes --------------------------------------------------------------------------------

    def up(self, *services: str, worker_concurrency: int = 1) -> Self:
        """Start ``services`` (``worker``, ``scp``, ``api``) in that order; if one fails, close the whole stack."""
        starters = {"worker": lambda: self.start_worker(worker_concurrency), "scp": self.start_scp,
                    "api": self.start_api}
        try:
            for service in services:
                starters[service]()
        except BaseException:
            self.close()
            raise
        return self

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> PacsProcess:
        """Start `pacs ARGS` as process ``name`` (replacing a stopped one of that name)."""
        old = self.processes.get(name)
        if old is not None:
            old.stop()
            self._stopped.append(old)
        process = PacsProcess(args, {**self.env, **(env or {})}, self.root / f"{name}.log").start()
        self.processes[name] = process
        return process

    def start_scp(self, name: str = "scp", port: int | None = None) -> PacsProcess:
        """`pacs scp` (on the stack's DICOM port unless told), once it answers C-ECHO."""
        port = port or self.port
        self._ports[name] = port
        process = self.start(name, ["scp"], {"PACS_DICOM_PORT": str(port)})
        try:
            process.wait_dicom(port)
        except BaseException:
            process.stop()
            raise
        return process

    def start_worker(self, concurrency: int = 1, name: str = "worker") -> PacsProcess:
        """`pacs worker`; a running worker of that name is left as it is."""
        running = self.processes.get(name)
        if running is not None and running.alive():
            return running
        return self.start(name, ["worker", "--concurrency", str(concurrency)])

    def start_api(self, name: str = "api") -> PacsProcess:
        """`pacs api`, once it answers /health."""
        process = self.start(name, ["api"])
        try:
            wait_http(self.http_url, 60)
        except TimeoutError:
            raise RuntimeError(f"pacs api did not start:\n{process.log_tail()}") from None
        return process

    def restart(self, name: str) -> PacsProcess:
        """Stop process ``name`` and start it again with the same arguments, log and port."""
        args = self.processes[name].args
        if args[0] == "scp":
            return self.start_scp(name, self._ports.get(name))
        if args[0] == "api":
            return self.start_api(name)
        return self.start(name, args)

    def stop(self, name: str) -> None:
        self.processes[name].stop()

    def stop_worker(self) -> None:
        self.stop("worker")

    @property
    def scp(self) -> PacsProcess:
        return self.processes["scp"]

    @property
    def worker(self) -> PacsProcess:
        return self.processes["worker"]

    @property
    def api(self) -> PacsProcess:
        return self.processes["api"]

    # -- the rest of the face ---------------------------------------------------------------------

    def token(self, role: str, **kwargs: object) -> str:
        """A new API token for ``role``, made in-process as `pacs token create` makes it
        (tests.support.inprocess.new_token; tests.support.http_api.create_token runs the command itself)."""
        return new_token(self.ctx, role, **kwargs)  # type: ignore[arg-type]

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{p.log_tail(40)}" for name, p in self.processes.items())

    def close(self) -> None:
        for process in [*reversed(self.processes.values()), *self._stopped]:
            process.stop()
        self.ctx.close()
        self._release()

    def _release(self) -> None:
        if self.db_proxy is not None:
            self.db_proxy.stop()
        drop_database(self.db_name)
        if self.broker_url and self.broker_url.startswith("redis"):
            with contextlib.suppress(redis.RedisError):  # the broker may be a server the test has stopped
                client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=2)
                for key in client.scan_iter(f"{self.queue}*"):
                    client.delete(key)


def scaled_api(root: Path, s3: SeaweedS3, extra_env: dict[str, str] | None = None,
               worker_concurrency: int = 1) -> ScaledStack:
    """The whole scaled configuration: `pacs worker` + `pacs scp` + `pacs api` on PostgreSQL, a fresh bucket and
    Redis (the face of :class:`EmbeddedPacs` for the HTTP tests)."""
    return ScaledStack(root, s3.url_for(f"pacs-api-{uuid.uuid4().hex[:12]}"), extra_env=extra_env).up(
        "worker", "scp", "api", worker_concurrency=worker_concurrency)


RunningArchive = EmbeddedPacs | ScaledStack
