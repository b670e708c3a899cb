"""A read-only HTML status page at /status on METRICS_PORT (STATUS_PAGE_ENABLED).

For a person with `kubectl port-forward`: queue depth by status, the oldest pending row's
wait, the jobs in flight with their progress and runner, recent failures with their reasons
and the `kubectl logs` commands that show them, and what finished over the last hour.

Each request reads the database in one short READ ONLY transaction on a connection of its
own (named queries `status_*` in controller/queries.sql, each bounded by an index, a window
and a LIMIT), so the page never touches the service loop's connection and cannot write. A
database error answers 503 with the reason. Everything shown is escaped by Jinja2's
autoescape: titles and messages come from users and from media.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import jinja2
import psycopg2
import psycopg2.extensions

from controller.jobs_cli import age_text, attempts_text, log_commands
from controller.metrics import Page
from controller.settings import ControllerSettings
from controller.store import Q, read_queue_depth
from dharma_common.contract import JobStatus
from dharma_common.errors import first_line

log = logging.getLogger(__name__)

PATH = "/status"
#: Failures finished within this window are listed, newest first, at most FAILURE_LIMIT.
FAILURE_WINDOW_SECONDS = 24 * 3600
FAILURE_LIMIT = 20
#: In-flight rows shown (MAX_CONCURRENT_JOBS caps them anyway).
INFLIGHT_LIMIT = 200
#: Throughput: the last hour, in intervals of five minutes.
THROUGHPUT_WINDOW_SECONDS = 3600
THROUGHPUT_BUCKETS = 12
#: The page's own statement timeout: a person waits for it, the service loop does not.
STATEMENT_TIMEOUT_MS = 5000
#: Requests read at once; more wait up to BUSY_WAIT_SECONDS, then get 503.
CONCURRENT_READS = 2
BUSY_WAIT_SECONDS = 5.0


@dataclass
class Snapshot:
    """What one request read, in one transaction."""

    depth: dict[str, int]
    depth_exact: bool
    oldest_pending_seconds: float
    inflight: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    throughput: list[dict[str, Any]] = field(default_factory=list)


def _rows(cur: Any) -> list[dict[str, Any]]:
    names = [column[0] for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


class StatusPage:
    """The page: `page()` reads and renders one response. Thread-safe (a connection per
    request), so the probe server's threads may call it at once."""

    def __init__(self, settings: ControllerSettings, refresh_seconds: int = 15) -> None:
        self._settings = settings
        self._refresh_seconds = refresh_seconds
        #: kubectl commands only where runners are Jobs; the local executor's are processes.
        self._namespace = settings.NAMESPACE if settings.EXECUTOR == "kubernetes" else None
        self._busy = threading.BoundedSemaphore(CONCURRENT_READS)
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("controller", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._template = self._env.get_template("status.html.j2")

    def page(self) -> Page:
        if not self._busy.acquire(timeout=BUSY_WAIT_SECONDS):
            return Page(503, self._render(None, "busy: too many status requests at once"))
        try:
            snapshot = self.read()
        except psycopg2.Error as exc:
            why = f"PostgreSQL at {self._settings.describe()}: {first_line(exc)}"
            log.warning(
                "status page: database unavailable",
                extra={"action": "status_page_database_error", "error": why},
            )
            return Page(503, self._render(None, why))
        finally:
            self._busy.release()
        return Page(200, self._render(snapshot, None))

    def read(self) -> Snapshot:
        kwargs = self._settings.connect_kwargs(f"dharma-controller status {self._identity()}")
        kwargs["options"] = (
            f"{kwargs.get('options', '')} -c statement_timeout={STATEMENT_TIMEOUT_MS}"
        )
        conn = psycopg2.connect(**kwargs)
        try:
            # One snapshot for every number on the page, and no write can happen.
            conn.set_session(
                isolation_level=psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
                readonly=True,
            )
            with conn, conn.cursor() as cur:
                depth, exact = read_queue_depth(cur)
                cur.execute(Q["oldest_pending_age"])
                snapshot = Snapshot(
                    depth={status.value: depth.get(status, 0) for status in JobStatus},
                    depth_exact=exact,
                    oldest_pending_seconds=float(cur.fetchone()[0]),
                )
                cur.execute(Q["status_inflight"], {"limit": INFLIGHT_LIMIT})
                snapshot.inflight = _rows(cur)
                cur.execute(
                    Q["status_failures"],
                    {"window": FAILURE_WINDOW_SECONDS, "limit": FAILURE_LIMIT},
                )
                snapshot.failures = _rows(cur)
                bucket = THROUGHPUT_WINDOW_SECONDS // THROUGHPUT_BUCKETS
                cur.execute(
                    Q["status_throughput"],
                    {"window": THROUGHPUT_WINDOW_SECONDS, "bucket": bucket,
                     "buckets": THROUGHPUT_BUCKETS},
                )  # fmt: skip
                snapshot.throughput = self._intervals(_rows(cur), bucket)
        finally:
            conn.close()
        for job in snapshot.inflight + snapshot.failures:
            job["attempt_text"] = attempts_text(
                job["attempts"], job["attempts_base"], job["max_attempts"]
            )
            job["log_commands"] = log_commands(job, self._namespace) if self._namespace else []
        return snapshot

    @staticmethod
    def _intervals(rows: list[dict[str, Any]], bucket: int) -> list[dict[str, Any]]:
        """Every interval of the window, oldest first, with zeros where nothing finished."""
        found = {row["bucket"]: row for row in rows}
        intervals = []
        for n in reversed(range(THROUGHPUT_BUCKETS)):
            row = found.get(n, {"completed": 0, "failed": 0})
            start, end = (n + 1) * bucket // 60, n * bucket // 60
            label = f"{end}-{start} min ago" if end else f"last {start} min"
            intervals.append({"label": label, "completed": row["completed"],
                              "failed": row["failed"]})  # fmt: skip
        return intervals

    def _identity(self) -> str:
        return self._settings.identity()

    def _render(self, snapshot: Snapshot | None, error: str | None) -> bytes:
        most = 1
        if snapshot is not None:
            most = max([1] + [i["completed"] + i["failed"] for i in snapshot.throughput])
        text = self._template.render(
            snapshot=snapshot,
            error=error,
            most=most,
            age=age_text,
            identity=self._identity(),
            executor=self._settings.EXECUTOR,
            namespace=self._namespace,
            refresh_seconds=self._refresh_seconds,
            failure_window=age_text(FAILURE_WINDOW_SECONDS),
            failure_limit=FAILURE_LIMIT,
            now=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
        return text.encode("utf-8")
