"""Real services for the tests, benchmarks and demo: a PostgreSQL server and a WsgiDAV server.

Nothing here is mocked. PostgreSQL is Debian's server binary run on a private data directory
and port (as the `postgres` user when the suite runs as root, since PostgreSQL refuses root);
each test gets its own database cloned from a migrated template (procrastinate's approach),
so tests never see each other's rows. WsgiDAV serves a temporary directory over real HTTP
with Basic auth, behind a small WSGI layer that can fail or stall chosen requests — the
"server that fails a few requests before succeeding".
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from controller.migrate import migrate
from dharma_common.settings import DatabaseSettings

DB_USER = "dharma"
DB_PASSWORD = "dharma-test-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pg_bindir() -> Path:
    roots = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    if roots:
        return roots[-1]
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")


def _as_postgres() -> tuple[list[str], Callable[[Path], None]]:
    """Command prefix and chown function: PostgreSQL will not run as root."""
    if os.geteuid() != 0:
        return [], lambda path: None
    entry = pwd.getpwnam("postgres")

    def chown(path: Path) -> None:
        os.chown(path, entry.pw_uid, entry.pw_gid)

    return ["runuser", "-u", "postgres", "--"], chown


class PostgresServer:
    """One PostgreSQL instance; `restart()` and `kill()` exist for reliability tests."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="dharma-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = free_port()
        self.bindir = _pg_bindir()
        self._prefix, chown = _as_postgres()
        self._proc: subprocess.Popen[bytes] | None = None
        self.sockets.mkdir(parents=True, exist_ok=True)
        chown(self.root)
        chown(self.sockets)
        pwfile = self.root / "pw"
        pwfile.write_text(DB_PASSWORD + "\n")
        chown(pwfile)
        subprocess.run(
            [
                *self._prefix, str(self.bindir / "initdb"), "-D", str(self.data), "-U", DB_USER,
                "--pwfile", str(pwfile), "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C", "--no-sync",
            ],
            check=True, capture_output=True,
        )  # fmt: skip

    def start(self) -> None:
        """fsync and full-page writes are off for speed: they only matter when the operating
        system crashes. synchronous_commit stays on (PostgreSQL's default): without it a
        commit already acknowledged is lost when the server crashes, which the controller's
        guarantees assume never happens (docs/reliability.md, "What the guarantees assume")."""
        log = (self.root / "postgres.log").open("ab")
        self._proc = subprocess.Popen(
            [
                *self._prefix, str(self.bindir / "postgres"), "-D", str(self.data),
                "-p", str(self.port), "-k", str(self.sockets), "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off", "-c", "full_page_writes=off",
                "-c", "max_connections=400", "-c", "shared_buffers=128MB",
            ],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg2.connect(**self.settings("postgres").connect_kwargs("probe")).close()
                return
            except psycopg2.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start; see {self.root}/postgres.log"
                    ) from None
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT is PostgreSQL's fast shutdown; SIGKILL simulates a crash of the server.

        A crash must take every server process down at once, as a dead machine or container
        would: PostgreSQL's children (checkpointer, WAL writer, backends) each run in their
        own session, so killing the postmaster's group alone leaves them writing while the
        next server starts on the same data directory — which loses committed data, a
        failure no real crash produces."""
        if self._proc is None:
            return
        if sig == signal.SIGKILL:
            doomed = self._server_pids()
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)
        self._proc.wait(timeout=60)
        self._proc = None
        if sig == signal.SIGKILL:
            deadline = time.monotonic() + 30
            while any(_running(pid) for pid in doomed):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL processes {doomed} survived SIGKILL")
                time.sleep(0.05)
            # A crashed postmaster leaves its pid file and socket lock behind; the next start
            # would refuse if their pid has been reused ("lock file already exists").
            for stale in [self.data / "postmaster.pid", *self.sockets.glob(".s.PGSQL.*")]:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _server_pids(self) -> list[int]:
        """The postmaster (from its pid file) and all its children."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *(int(pid) for pid in children)]

    def restart(self, crash: bool = False) -> None:
        self.stop(signal.SIGKILL if crash else signal.SIGINT)
        self.start()

    def settings(self, dbname: str) -> DatabaseSettings:
        return DatabaseSettings(
            DB_HOST="127.0.0.1",
            DB_PORT=self.port,
            DB_NAME=dbname,
            DB_USER=DB_USER,
            DB_PASSWORD=DB_PASSWORD,  # type: ignore[arg-type]
            DB_CONNECT_TIMEOUT=5,
        )

    def admin(self) -> Any:
        conn = psycopg2.connect(**self.settings("postgres").connect_kwargs("tests"))
        conn.autocommit = True
        return conn

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _running(pid: int) -> bool:
    """Is `pid` a live process (a zombie has exited and holds no files)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@dataclass
class Database:
    """A test's own database, cloned from the migrated template."""

    server: PostgresServer
    name: str
    settings: DatabaseSettings

    def connect(self) -> Any:
        conn = psycopg2.connect(**self.settings.connect_kwargs("tests"))
        conn.autocommit = True
        return conn

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            "DB_HOST": s.DB_HOST, "DB_PORT": str(s.DB_PORT), "DB_NAME": s.DB_NAME,
            "DB_USER": s.DB_USER, "DB_PASSWORD": s.DB_PASSWORD.get_secret_value(),
        }  # fmt: skip


class DatabaseFactory:
    """Creates per-test databases from a template migrated once per session."""

    TEMPLATE = "dharma_template"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        with contextlib.closing(server.admin()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {self.TEMPLATE}")
        migrate(server.settings(self.TEMPLATE))

    def create(self) -> Database:
        """A clone of the template with its own installation id (migration 0004), as a
        database migrated on its own would have: a clone carries the template's along."""
        name = "t_" + uuid.uuid4().hex[:16]
        with contextlib.closing(self.server.admin()) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE}")
        database = Database(self.server, name, self.server.settings(name))
        with contextlib.closing(database.connect()) as conn, conn.cursor() as cur:
            cur.execute("UPDATE dharma.installation SET id = gen_random_uuid()")
        return database

    def drop(self, db: Database) -> None:
        with contextlib.closing(self.server.admin()) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")


# --------------------------------------------------------------------------- WebDAV ---


@dataclass
class Fault:
    method: str | None
    path_contains: str | None
    status: int = 503
    stall_seconds: float = 0.0
    remaining: int = 1


@dataclass
class Request:
    method: str
    path: str
    status: int
    at: float


@dataclass
class FaultInjector:
    """WSGI middleware: fails or stalls matching requests, and records every request."""

    app: Callable[..., Iterable[bytes]]
    faults: list[Fault] = field(default_factory=list)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Set when the server closes: stalled requests end at once, so a long stall never
    #: holds up a test's teardown.
    released: threading.Event = field(default_factory=threading.Event)

    def fail(
        self, count: int, status: int = 503, method: str | None = None, path: str | None = None
    ) -> None:
        with self.lock:
            self.faults.append(Fault(method, path, status=status, remaining=count))

    def stall(
        self, count: int, seconds: float, method: str | None = None, path: str | None = None
    ) -> None:
        with self.lock:
            self.faults.append(
                Fault(method, path, status=0, stall_seconds=seconds, remaining=count)
            )

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()

    def _match(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.remaining <= 0:
                    continue
                if fault.method and fault.method != method:
                    continue
                if fault.path_contains and fault.path_contains not in path:
                    continue
                fault.remaining -= 1
                return fault
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        fault = self._match(method, path)
        if fault is not None and fault.stall_seconds:
            self.released.wait(fault.stall_seconds)
        if fault is not None and fault.status:
            self._record(method, path, fault.status)
            start_response(f"{fault.status} Injected Fault", [("Content-Length", "0")])
            return [b""]
        status_box: list[int] = []

        def recording_start(status: str, headers: Any, exc_info: Any = None) -> Any:
            status_box.append(int(status.split(maxsplit=1)[0]))
            return (
                start_response(status, headers, exc_info)
                if exc_info
                else start_response(status, headers)
            )

        result = self.app(environ, recording_start)
        self._record(method, path, status_box[0] if status_box else 0)
        return result

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append(Request(method, path, status, time.monotonic()))


class WebDAVServer:
    """WsgiDAV on a temporary directory, Basic auth, served by cheroot on loopback."""

    user = "dav-user"
    password = "dav-secret"

    def __init__(self, root: Path | None = None) -> None:
        from cheroot import wsgi
        from wsgidav.wsgidav_app import WsgiDAVApp

        self.root = root or Path(tempfile.mkdtemp(prefix="dharma-dav-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = {
            "host": "127.0.0.1",
            "port": self.port,
            "provider_mapping": {"/": str(self.root)},
            "simple_dc": {"user_mapping": {"*": {self.user: {"password": self.password}}}},
            "http_authenticator": {
                "accept_basic": True,
                "accept_digest": False,
                "default_to_digest": False,
            },
            "verbose": 0,
            "logging": {"enable": False},
            "property_manager": None,
            "lock_storage": True,
        }
        self.faults = FaultInjector(WsgiDAVApp(config))
        self._server = wsgi.Server(("127.0.0.1", self.port), self.faults, numthreads=16)
        self._thread = threading.Thread(target=self._server.safe_start, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.ready:
            if time.monotonic() > deadline:
                raise RuntimeError("WsgiDAV did not start")
            time.sleep(0.02)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "WEBDAV_BASE_URL": self.base_url,
            "WEBDAV_USER": self.user,
            "WEBDAV_PASSWORD": self.password,
        }

    def put_file(self, relative: str, source: Path) -> None:
        """Place an upload directly on disk (what the admin's upload would have done)."""
        target = self.root / relative.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def path(self, relative: str) -> Path:
        return self.root / relative.lstrip("/")

    def close(self) -> None:
        self.faults.released.set()
        self._server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running(factory: Callable[[], Any]) -> Iterator[Any]:
    thing = factory()
    try:
        yield thing
    finally:
        thing.close()
