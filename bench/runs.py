"""What the runner benchmarks share: the services the runner needs (`runner_services`), a
claimed attempt to run, and the command that runs it.

The row is inserted as the controller leaves it after a claim (`processing`, attempt 1), so
the runner is measured alone, without a controller or a Kubernetes Job around it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2

from devtools.services import DatabaseFactory, PostgresServer, WebDAVServer
from dharma_common import contract


@dataclass
class RunnerServices:
    """What a runner benchmark gets from `runner_services`."""

    #: An autocommit connection to the migrated database (named `bench`), for the job rows.
    conn: Any
    #: The WebDAV server the runner downloads the talk from and uploads its results to.
    dav: WebDAVServer
    #: The runner's environment: this process's, the database's and WebDAV's settings, the
    #: whisper settings and the benchmark's own (`extra_env`).
    env: dict[str, str]
    #: A scratch directory for the runner (SCRATCH_DIR) and the benchmark's own files.
    scratch: Path


@contextmanager
def runner_services(
    model: Path, threads: int, log_level: str, extra_env: Mapping[str, str] | None = None
) -> Iterator[RunnerServices]:
    """A local PostgreSQL with a migrated database and a WebDAV server, both with the
    environment that points a jobrunner at them, closed (scratch directory included) on exit
    whatever happened. One place for what bench.longtalk and bench.pipeline both need, so
    that their runners see the same settings; `extra_env` carries each benchmark's own
    (e.g. WHISPER_WINDOW_SECONDS) and wins over the common ones."""
    with ExitStack() as stack:
        pg = PostgresServer()
        stack.callback(pg.close)
        pg.start()
        dav = WebDAVServer()
        stack.callback(dav.close)
        db = DatabaseFactory(pg).create()
        conn = psycopg2.connect(**db.settings.connect_kwargs("bench"))
        stack.callback(conn.close)
        conn.autocommit = True
        scratch = Path(tempfile.mkdtemp(prefix="dharma-bench-"))
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)
        env = {
            **os.environ, **db.env(), **dav.env(),
            "WHISPER_MODEL": str(model), "WHISPER_LANGUAGE": "en",
            "WHISPER_THREADS": str(threads), "SCRATCH_DIR": str(scratch),
            "TERMINATION_MESSAGE_PATH": str(scratch / "termination-log"), "LOG_LEVEL": log_level,
            **(extra_env or {}),
        }  # fmt: skip
        yield RunnerServices(conn=conn, dav=dav, env=env, scratch=scratch)


def claimed_attempt(conn: Any, source_path: str) -> int:
    """Insert a media row for `source_path` and its job, claimed as attempt 1: the job id."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path) VALUES ('bench', %s)"
            " RETURNING id", (source_path,),
        )  # fmt: skip
        media_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO dharma.stt_jobs (media_id, status, attempts) VALUES"
            " (%s, 'processing', 1) RETURNING id", (media_id,),
        )  # fmt: skip
        job_id: int = cur.fetchone()[0]
    return job_id


def runner_command(job_id: int) -> list[str]:
    """`python -m jobrunner run` for attempt 1 of `job_id`, with this interpreter."""
    return contract.runner_command(job_id, 1, python=sys.executable)
