"""The runner's download against misbehaving HTTP servers (issue 10, defect 8).

WsgiDAV cannot be made to drip bytes or send malformed headers, so these tests serve the
source from a small real HTTP server of their own on 127.0.0.1 (`http.server`, one thread
per connection) that writes raw header lines and paces its body. The runner is the real
process; PostgreSQL is the suite's real server.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.media import make_media
from dharma_common.contract import ExitCode
from tests.conftest import Queue
from tests.integration.runner import run_jobrunner

pytestmark = pytest.mark.integration


class OddServer(http.server.ThreadingHTTPServer):
    """Serves `body` for every GET with the given raw header lines, writing `drip` bytes at
    a time every `pause` seconds (drip 0: all at once). Records each request's headers."""

    daemon_threads = True

    def __init__(self, body: bytes, headers: list[tuple[str, str]], drip: int = 0,
                 pause: float = 0.0) -> None:  # fmt: skip
        self.body, self.headers, self.drip, self.pause = body, headers, drip, pause
        self.requests: list[dict[str, str]] = []
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.requests.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(200)
                for name, value in server.headers:
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                self.end_headers()
                # OSError: the runner gave up and closed the connection, as it should.
                with contextlib.suppress(OSError):
                    server.write_body(self.wfile)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def write_body(self, out: Any) -> None:
        if not self.drip:
            out.write(self.body)
            return
        for at in range(0, len(self.body), self.drip):
            if self.stop.wait(self.pause):
                return
            out.write(self.body[at : at + self.drip])
            out.flush()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def talk(media_dir: Path) -> bytes:
    return make_media("audio_mp3", media_dir).read_bytes()


@pytest.fixture
def serve(runner_env: dict[str, str]) -> Iterator[Any]:
    servers: list[OddServer] = []

    def start(server: OddServer) -> OddServer:
        servers.append(server)
        runner_env["WEBDAV_BASE_URL"] = server.base_url
        return server

    yield start
    for server in servers:
        server.close()


def test_slow_drip_server_is_abandoned_at_the_minimum_rate(
    queue: Queue, runner_env: dict[str, str], scratch: Path, talk: bytes, serve: Any
) -> None:
    """A byte every 0.1 s never trips the 2 s per-read timeout, and the talk would take an
    hour at 10 bytes/s. Under 16 KiB/s over each 2 s (HTTP_TIMEOUT_SECONDS) the try is
    abandoned, so two tries end in about 4 s with a temporary error that says why."""
    server = serve(OddServer(talk, [("Content-Length", str(len(talk)))], drip=1, pause=0.1))
    runner_env.update(HTTP_TIMEOUT_SECONDS="2", HTTP_RETRIES="2")
    job = queue.job("audio_mp3")
    started = time.monotonic()
    result = run_jobrunner(runner_env, job.job_id, job.attempt, timeout=60)
    elapsed = time.monotonic() - started
    assert result.code == ExitCode.TEMPORARY, result.stderr
    assert "failed after 2 tries" in result.message, result.message
    assert "too slow" in result.message and "16,384 bytes/s" in result.message
    assert elapsed < 20, f"held for {elapsed:.0f} s"
    assert len(server.requests) == 2
    assert list(scratch.iterdir()) == []


def test_download_asks_for_the_identity_encoding(
    queue: Queue, runner_env: dict[str, str], talk: bytes, serve: Any
) -> None:
    """A compressed body would make the byte counts (limit, Content-Length) meaningless."""
    server = serve(OddServer(talk, [("Content-Length", str(len(talk)))]))
    job = queue.job("audio_mp3")
    run_jobrunner(runner_env, job.job_id, job.attempt, timeout=60)
    assert server.requests and server.requests[0].get("accept-encoding") == "identity"


@pytest.mark.parametrize(
    "values",
    [["12abc"], ["-5"], ["+{n}"], ["{n}", "{m}"], ["{n}, {m}"], ["1_000"], [" "]],
    ids=["letters", "negative", "plus-sign", "two-headers", "two-values", "underscore", "blank"],
)
def test_malformed_content_length_is_refused(
    queue: Queue, runner_env: dict[str, str], scratch: Path, talk: bytes, serve: Any,
    values: list[str],
) -> None:  # fmt: skip
    """The body is the real talk each time, so without strict parsing the job completed
    (or, for differing values, crashed as an internal error)."""
    n, m = len(talk), len(talk) + 7
    headers = [("Content-Length", v.format(n=n, m=m)) for v in values]
    serve(OddServer(talk, headers))
    runner_env["HTTP_RETRIES"] = "1"
    job = queue.job("audio_mp3")
    result = run_jobrunner(runner_env, job.job_id, job.attempt, timeout=60)
    assert result.code == ExitCode.TEMPORARY, result.stderr
    assert "invalid Content-Length" in result.message, result.message
    assert "internal error" not in result.message
    assert list(scratch.iterdir()) == []


def test_repeated_equal_content_length_is_accepted(
    queue: Queue, runner_env: dict[str, str], talk: bytes, serve: Any, scratch: Path
) -> None:
    """RFC 9110 allows the same length repeated; the download must not fail on it (the
    upload goes to the same odd server, which does not take PUTs: the attempt then fails
    at MKCOL, after the download and the encode)."""
    serve(OddServer(talk, [("Content-Length", str(len(talk)))] * 2))
    runner_env["HTTP_RETRIES"] = "1"
    job = queue.job("audio_mp3")
    result = run_jobrunner(runner_env, job.job_id, job.attempt, timeout=60)
    assert result.events("source_downloaded"), result.stderr
    assert "Content-Length" not in result.message
    assert list(scratch.iterdir()) == []
