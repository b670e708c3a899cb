"""The runners' database role (migration 0005, issue 10 "least privilege"), on the real
PostgreSQL the tests start.

A login IN ROLE dharma_runner — made the way the README tells operators to — runs a whole
attempt: the store's calls one by one, and a real `dharma-jobrunner` process from download to
committed subtitles. The same login is refused everything else a taken-over runner might try:
moving a job's status, writing its verdict or schedule, reading columns and tables it needs
nothing from, adding or deleting queue rows.
"""

from __future__ import annotations

import contextlib

import psycopg2
import psycopg2.errors
import pytest

from devtools.services import Database
from jobrunner.store import RunnerStore
from jobrunner.subtitles import Segment
from tests.conftest import Queue, RunnerLogin
from tests.integration.runner import run_jobrunner

pytestmark = pytest.mark.integration


def test_migration_made_a_nologin_group_role(db: Database) -> None:
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls"
            " FROM pg_roles WHERE rolname = 'dharma_runner'"
        )
        assert cur.fetchone() == (False, False, False, False, False)


def test_runner_role_runs_a_whole_attempt_through_the_store(
    queue: Queue, runner_login: RunnerLogin
) -> None:
    job = queue.job("audio_mp3")
    store = RunnerStore(runner_login.settings, job.job_id, job.attempt)
    try:
        attempt = store.load()
        assert attempt.media_id == job.media_id
        assert store.still_owned()
        assert store.set_progress(0.5)
        segments = [Segment(0, 1500, "first"), Segment(1500, 3000, "second")]
        store.commit_results(job.media_id, segments, 11.0)
        # Twice: the second commit replaces the first's subtitles (DELETE + INSERT).
        store.commit_results(job.media_id, segments, 11.0)
    finally:
        store.close()
    assert queue.row(
        "SELECT progress, result_attempt, status FROM dharma.stt_jobs WHERE id = %s", job.job_id
    ) == (1.0, job.attempt, "processing")
    assert queue.row(
        "SELECT duration_seconds FROM dharma.media_files WHERE id = %s", job.media_id
    ) == (11.0,)
    texts = queue.rows(
        "SELECT text FROM dharma.subtitles WHERE media_id = %s ORDER BY start_time_ms",
        job.media_id,
    )
    assert texts == [("first",), ("second",)]


def test_real_runner_completes_a_talk_as_the_runner_role(
    queue: Queue, runner_env: dict[str, str], runner_login: RunnerLogin
) -> None:
    runner_env.update(DB_USER=runner_login.name, DB_PASSWORD=runner_login.password)
    job = queue.job("audio_mp3")
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == 0, result.message
    assert queue.row("SELECT result_attempt FROM dharma.stt_jobs WHERE id = %s", job.job_id) == (
        job.attempt,
    )
    # (The weightless test model's words are not asserted on: it may produce none.)
    duration = queue.row(
        "SELECT duration_seconds FROM dharma.media_files WHERE id = %s", job.media_id
    )
    assert duration[0] and duration[0] > 0


#: What a taken-over runner might try; each must be refused for lack of privilege.
REFUSED = [
    "UPDATE dharma.stt_jobs SET status = 'completed' WHERE id = %(job_id)s",
    "UPDATE dharma.stt_jobs SET error_message = 'x', failure_reason = 'x' WHERE id = %(job_id)s",
    "UPDATE dharma.stt_jobs SET attempts = attempts + 1 WHERE id = %(job_id)s",
    "UPDATE dharma.stt_jobs SET max_attempts = 100, run_after = now() WHERE id = %(job_id)s",
    "UPDATE dharma.stt_jobs SET priority = 100 WHERE id = %(job_id)s",
    "SELECT claimed_by, runner_name, error_message FROM dharma.stt_jobs",
    "SELECT * FROM dharma.stt_jobs",
    "SELECT title FROM dharma.media_files",
    "UPDATE dharma.media_files SET source_path = '/etc/passwd' WHERE id = %(media_id)s",
    "UPDATE dharma.media_files SET category_id = 'x' WHERE id = %(media_id)s",
    "INSERT INTO dharma.stt_jobs (media_id) VALUES (%(media_id)s)",
    "DELETE FROM dharma.stt_jobs WHERE id = %(job_id)s",
    "INSERT INTO dharma.media_files (category_id, source_path) VALUES ('x', '/x')",
    "DELETE FROM dharma.media_files WHERE id = %(media_id)s",
    "UPDATE dharma.subtitles SET text = 'x' WHERE media_id = %(media_id)s",
    "SELECT * FROM dharma.schema_migrations",
    "TRUNCATE dharma.subtitles",
    "CREATE TABLE dharma.planted (x int)",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_runner_role_is_refused_the_rest(queue: Queue, runner_login: RunnerLogin, sql: str) -> None:
    job = queue.job("audio_mp3")
    params = {"job_id": job.job_id, "media_id": job.media_id}
    with (
        contextlib.closing(runner_login.connect()) as conn,
        conn.cursor() as cur,
        pytest.raises(psycopg2.errors.InsufficientPrivilege),
    ):
        cur.execute(sql, params)
    assert queue.row(
        "SELECT status, attempts, error_message FROM dharma.stt_jobs WHERE id = %s", job.job_id
    ) == ("processing", job.attempt, None)
