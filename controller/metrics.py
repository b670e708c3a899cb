"""Prometheus metrics of one controller process (its own registry, so tests can run several
controllers in one interpreter), and the HTTP endpoint that serves them with the probes.

Endpoints on METRICS_PORT:
- `/metrics`: the Prometheus text format;
- `/healthz`: 200 while the service loop is alive (it completed a loop turn recently) and
  every background thread it depends on (watches, lease, LISTEN) is running, else 503 with
  the reason — the liveness probe restarts a wedged process or one with a dead thread;
- `/readyz`: 200 once the executor has synced and the database answered the last pass, and
  while /healthz is 200, else 503 with the reason;
- the pages in `Metrics.pages` (`/status` with STATUS_PAGE_ENABLED: controller/status_page.py).

Everything here is read-only: GET and HEAD; any other method is refused with 405.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from dharma_common.contract import JobStatus
from dharma_common.errors import first_line

log = logging.getLogger(__name__)


class Page(NamedTuple):
    """A response of an extra page: status code, body, content type."""

    code: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"


#: Headers of every extra page: nothing cached, nothing embedded elsewhere, no script, no
#: request to any other place (a defence in depth: the pages escape what they show).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; form-action 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: The methods the server answers; everything else is refused (nothing here writes).
READ_METHODS = "GET, HEAD"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        #: Extra read-only pages served next to /metrics, by path, each a callable making
        #: the response (controller/run.py adds /status when STATUS_PAGE_ENABLED).
        self.pages: dict[str, Callable[[], Page]] = {}
        r = self.registry
        self.queue_jobs = Gauge(
            "dharma_queue_jobs",
            "Rows in dharma.stt_jobs by status (finished statuses estimated past 100k rows).",
            ["status"],
            registry=r,
        )
        self.oldest_pending = Gauge(
            "dharma_queue_oldest_pending_age_seconds",
            "How long the longest-waiting claimable row has waited.",
            registry=r,
        )
        self.claims = Counter("dharma_claims_total", "Attempts claimed.", registry=r)
        self.launches = Counter(
            "dharma_runner_launches_total", "Runners launched, by result.", ["result"], registry=r
        )
        self.outcomes = Counter(
            "dharma_attempt_outcomes_total",
            "Finished attempts by outcome: success or a failure reason.",
            ["outcome"],
            registry=r,
        )
        self.retries = Counter(
            "dharma_retries_total", "Failed attempts sent back to pending.", ["reason"], registry=r
        )
        self.duration = Histogram(
            "dharma_attempt_duration_seconds",
            "Wall time of an attempt, claim to recorded outcome.",
            ["outcome"],
            buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
            registry=r,
        )
        self.in_flight = Gauge(
            "dharma_runners_in_flight", "Runners started and not finished.", registry=r
        )
        self.runners_pending = Gauge(
            "dharma_runners_pending",
            "Runners started whose pod is not running yet (Kubernetes executor, leader).",
            registry=r,
        )
        self.runner_oldest_pending = Gauge(
            "dharma_runner_oldest_pending_age_seconds",
            "How long the longest-waiting runner has waited for its pod to run (Kubernetes "
            "executor, leader; the clock PENDING_TIMEOUT_SECONDS is measured on).",
            registry=r,
        )
        self.deleted = Counter(
            "dharma_runner_deletions_total",
            "Runners stopped by the controller, by why.",
            ["why"],
            registry=r,
        )
        self.leader = Gauge(
            "dharma_leader", "1 while this replica holds the leader Lease.", registry=r
        )
        self.db_errors = Counter(
            "dharma_database_errors_total", "Passes that lost the database.", registry=r
        )
        self.relists = Counter(
            "dharma_watch_relists_total",
            "Full relists of the Job/pod watch (start, 410 Gone, dropped watch).",
            ["resource"],
            registry=r,
        )
        self.passes = Counter("dharma_reconcile_passes_total", "Reconcile passes.", registry=r)
        self.events_dropped = Counter(
            "dharma_events_dropped_total",
            "Kubernetes Events about runner Jobs not posted, by why"
            " (rate_limited, queue_full, refused, error).",
            ["why"],
            registry=r,
        )
        for status in JobStatus:
            self.queue_jobs.labels(status=status.value).set(0)


class Health:
    """What the probes report, updated by the service loop."""

    def __init__(self, liveness_window: float) -> None:
        self.liveness_window = liveness_window
        self._beat = time.monotonic()
        self.not_ready: str | None = "starting"
        self._checks: list[Callable[[], str | None]] = []

    def add_check(self, check: Callable[[], str | None]) -> None:
        """Something the loop depends on that can fail on its own (a background thread):
        `check()` returns why it is broken, or None."""
        self._checks.append(check)

    def beat(self) -> None:
        self._beat = time.monotonic()

    def alive(self) -> bool:
        return self.problem() is None

    def problem(self) -> str | None:
        """Why the process should be restarted (liveness), or None."""
        if time.monotonic() - self._beat >= self.liveness_window:
            return "service loop stalled"
        for check in self._checks:
            why = check()
            if why:
                return why
        return None

    def unready(self) -> str | None:
        """Why this replica is not ready, or None."""
        return self.problem() or self.not_ready


class ProbeServer:
    """A small threaded HTTP server for /metrics, /healthz, /readyz and `Metrics.pages`."""

    def __init__(self, port: int, metrics: Metrics, health: Health) -> None:
        registry = metrics.registry
        pages = metrics.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    why = health.problem()
                    self._send(503 if why else 200, f"{why or 'ok'}\n".encode())
                elif path == "/readyz":
                    why = health.unready()
                    self._send(503 if why else 200, f"{why or 'ok'}\n".encode())
                elif path in pages:
                    self._page(pages[path])
                else:
                    self._send(404, b"not found\n")

            def do_HEAD(self) -> None:
                """GET's status and headers without the body (`_send` leaves it out)."""
                self.do_GET()

            def _refuse(self) -> None:
                self._send(405, b"method not allowed: this server is read-only\n",
                           headers={"Allow": READ_METHODS})  # fmt: skip

            # Every method http.server would otherwise answer with 501 (the names are its).
            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815
            do_OPTIONS = do_TRACE = do_CONNECT = _refuse  # noqa: N815

            def _page(self, make: Callable[[], Page]) -> None:
                try:
                    page = make()
                except Exception as exc:
                    log.exception(
                        "page failed", extra={"action": "page_failed", "path": self.path,
                                              "error": first_line(exc)}
                    )  # fmt: skip
                    self._send(500, b"internal error: see the controller's log\n")
                    return
                self._send(page.code, page.body, page.content_type, PAGE_HEADERS)

            def _send(
                self,
                code: int,
                body: bytes,
                ctype: str = "text/plain",
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Probes every few seconds are not worth a log line."""

        self._server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - probes
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="probes", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
