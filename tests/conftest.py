"""Shared fixtures: real PostgreSQL, real WsgiDAV, generated media, runner environment."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from pydantic import SecretStr

from devtools.media import WEIGHTLESS_MODEL, make_media
from devtools.services import Database, DatabaseFactory, PostgresServer, WebDAVServer
from dharma_common.settings import DatabaseSettings

pytest_plugins = ["tests.controller_fixtures", "tests.testbed", "tests.images"]

#: Tests that share one cluster, one image engine or one real node, or whose budgets assume
#: they run alone: all of them run on one pytest-xdist worker, in order, while the other
#: workers take the unit and integration tests, which each start their own PostgreSQL and
#: WebDAV. Why: those wait on processes more than they compute (42% of the 2 CPUs idle
#: through the integration tests run alone), the cluster tests wait on Kubernetes.
#: By path, because the scheduler sees only node ids (xdist's `xdist_group` mark rewrites
#: node ids, which pytest 9 no longer lets a plugin do); the hook below refuses a test that
#: needs the cluster and is not under these paths.
SERIAL_PATHS = (
    "tests/e2e/", "tests/chaos/", "tests/realnode/",
    "tests/deploy/test_chart_e2e.py", "tests/deploy/test_images.py",
)  # fmt: skip
_SERIAL_MARKERS = ("e2e", "realnode", "chaos")
_SERIAL_FIXTURES = {"kube", "docker", "real_node"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        needs = fixtures & _SERIAL_FIXTURES or any(
            item.get_closest_marker(m) for m in _SERIAL_MARKERS
        )
        if needs and not item.nodeid.startswith(SERIAL_PATHS):
            raise pytest.UsageError(
                f"{item.nodeid} needs the cluster, the images or the real node: put it under"
                f" one of tests/conftest.py SERIAL_PATHS, which run on one worker in order"
            )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduling with every SERIAL_PATHS test in one scope, each other test
    in a scope of its own."""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class SerialPathsScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "serial" if nodeid.startswith(SERIAL_PATHS) else nodeid

    return SerialPathsScheduling(config, log)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def db_factory(pg_server: PostgresServer) -> DatabaseFactory:
    return DatabaseFactory(pg_server)


@pytest.fixture
def db(db_factory: DatabaseFactory) -> Iterator[Database]:
    """A fresh, migrated database of this test's own."""
    database = db_factory.create()
    yield database
    db_factory.drop(database)


@pytest.fixture
def dav() -> Iterator[WebDAVServer]:
    server = WebDAVServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


@dataclass
class Job:
    job_id: int
    media_id: uuid.UUID
    attempt: int


class Queue:
    """Direct SQL on a test database: enqueue media, claim as the controller would."""

    def __init__(self, db: Database, dav: WebDAVServer, media_dir: Path) -> None:
        self.db, self.dav, self.media_dir = db, dav, media_dir
        self.conn = db.connect()

    def add_media(
        self,
        kind_or_path: str | Path,
        source_path: str | None = None,
        category: str = "talks",
        created_at: dt.datetime | None = None,
    ) -> uuid.UUID:
        path = (
            kind_or_path
            if isinstance(kind_or_path, Path)
            else make_media(kind_or_path, self.media_dir)
        )
        source_path = source_path or f"/uploads/{uuid.uuid4().hex}/{path.name}"
        self.dav.put_file(source_path, path)
        with self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO dharma.media_files (title, category_id, source_path, created_at)"
                " VALUES (%s, %s, %s, %s) RETURNING id",
                (path.name, category, source_path,
                 created_at or dt.datetime(2025, 10, 21, 12, 0, tzinfo=dt.timezone.utc)),
            )  # fmt: skip
            media_id: uuid.UUID = cur.fetchone()[0]
        return media_id

    def enqueue(
        self, media_id: uuid.UUID, language: str | None = None, model: str | None = None
    ) -> int:
        with self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO dharma.stt_jobs (media_id, language, model) VALUES (%s, %s, %s)"
                " RETURNING id",
                (media_id, language, model),
            )
            job_id: int = cur.fetchone()[0]
        return job_id

    def claim(self, job_id: int) -> int:
        """What the controller's claim does to one row: processing, attempts + 1."""
        with self.conn.cursor() as cur:
            cur.execute(
                "UPDATE dharma.stt_jobs SET status = 'processing', attempts = attempts + 1,"
                " processing_started_at = now() WHERE id = %s RETURNING attempts",
                (job_id,),
            )
            attempt: int = cur.fetchone()[0]
        return attempt

    def job(self, kind: str | Path, language: str | None = None, **media: Any) -> Job:
        media_id = self.add_media(kind, **media)
        job_id = self.enqueue(media_id, language)
        return Job(job_id, media_id, self.claim(job_id))

    def row(self, sql: str, *params: Any) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def rows(self, sql: str, *params: Any) -> list[Any]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())


@pytest.fixture
def queue(db: Database, dav: WebDAVServer, media_dir: Path) -> Iterator[Queue]:
    q = Queue(db, dav, media_dir)
    yield q
    q.conn.close()


@pytest.fixture
def runner_env(db: Database, dav: WebDAVServer, scratch: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a real `dharma-jobrunner` process against this test's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "WEBDAV_", "WHISPER_"))}
    env.update(db.env())
    env.update(dav.env())
    env.update(
        {
            "WHISPER_MODEL": str(WEIGHTLESS_MODEL),
            "WHISPER_LANGUAGE": "en",
            "WHISPER_THREADS": "2",
            "SCRATCH_DIR": str(scratch),
            "TERMINATION_MESSAGE_PATH": str(tmp_path / "termination-log"),
            "HTTP_BACKOFF_SECONDS": "0.05",
            "PROGRESS_INTERVAL_SECONDS": "0.2",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
    )
    return env


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


# Registered here, in the root conftest, so `scripts/test -m chaos --chaos-seconds 600` works
# without naming tests/chaos on the command line (only initial conftests may add options).
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("chaos", "fault-injection suite (tests/chaos)")
    group.addoption(
        "--chaos-seconds",
        type=float,
        default=45.0,
        help="seconds of fault injection per chaos scenario (default 45)",
    )
    group.addoption(
        "--chaos-seed",
        type=int,
        default=None,
        help="seed of the chaos scenarios' random choices (default: time-based, printed)",
    )


@dataclass(frozen=True)
class RunnerLogin:
    name: str
    password: str
    settings: DatabaseSettings

    def connect(self) -> Any:
        conn = psycopg2.connect(**self.settings.connect_kwargs("tests-runner-role"))
        conn.autocommit = True
        return conn


@pytest.fixture
def runner_login(db: Database) -> Iterator[RunnerLogin]:
    """`CREATE ROLE ... LOGIN PASSWORD ... IN ROLE dharma_runner`, as in the README."""
    name = f"runner_{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s IN ROLE dharma_runner", (password,))
    settings = db.settings.model_copy(update={"DB_USER": name, "DB_PASSWORD": SecretStr(password)})
    yield RunnerLogin(name, password, settings)
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {name}")
