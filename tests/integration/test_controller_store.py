"""The controller's store against a real PostgreSQL: outcomes are fenced on the runner's
commit, and a lock held elsewhere fails a statement within DB_LOCK_TIMEOUT_SECONDS instead
of stalling the service loop."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from controller.migrate import available_migrations
from controller.model import RunnerKey
from controller.reconcile import FailureReason
from controller.settings import ControllerSettings
from controller.store import DatabaseUnavailable, MissingInstallation, Store
from devtools.services import Database
from dharma_common.contract import JobStatus
from dharma_common.settings import load_settings

pytestmark = pytest.mark.timeout(60)
TEMPORARY = FailureReason.RUNNER_TEMPORARY


def claimed(db: Database, committed: bool) -> RunnerKey:
    """A processing row at attempt 1, with or without the runner's commit."""
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path)"
            " VALUES ('talks', '/uploads/x.mp4') RETURNING id"
        )
        media_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO dharma.stt_jobs (media_id, status, attempts, result_attempt)"
            " VALUES (%s, 'processing', 1, %s) RETURNING id",
            (media_id, 1 if committed else None),
        )
        return RunnerKey(cur.fetchone()[0], 1)


def status(db: Database, key: RunnerKey) -> str:
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM dharma.stt_jobs WHERE id = %s", (key.job_id,))
        value: str = cur.fetchone()[0]
        return value


@pytest.fixture
def store(db: Database) -> Iterator[Store]:
    settings = load_settings(ControllerSettings, **db.env(), DB_LOCK_TIMEOUT_SECONDS="1")
    opened = Store(settings, "test-controller")
    yield opened
    opened.close()


def test_success_needs_the_runners_commit(db: Database, store: Store) -> None:
    key = claimed(db, committed=False)
    assert not store.record_success(key)
    assert status(db, key) == "processing"


def test_a_failure_never_overwrites_a_committed_result(db: Database, store: Store) -> None:
    """The pass read the row before the runner committed and exited 0: its "exited 0 but did
    not commit" failure must not land on the committed row."""
    key = claimed(db, committed=True)
    assert not store.record_retry(key, TEMPORARY, "not committed", 1.0, None)
    assert not store.record_failure(key, TEMPORARY, "not committed")
    assert status(db, key) == "processing"
    assert store.record_success(key)
    assert status(db, key) == "completed"


def test_a_held_lock_fails_the_statement_within_the_lock_timeout(
    db: Database, store: Store
) -> None:
    key = claimed(db, committed=False)
    holder: Any = db.connect()
    holder.autocommit = False
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM dharma.stt_jobs WHERE id = %s FOR UPDATE", (key.job_id,))
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="lock timeout"):
            store.set_runner_name(key, "dharma-stt-1-1")
        assert time.monotonic() - started < 5
    finally:
        holder.rollback()
        holder.close()
    assert store.set_runner_name(key, "dharma-stt-1-1")  # reconnects; the lock is gone


def test_session_timeouts_are_set(store: Store) -> None:
    with store._tx() as cur:
        cur.execute(
            "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        )
        assert cur.fetchone() == ("30s", "1s", "1min")


def test_installation_id_is_one_row_the_database_generates(db: Database, store: Store) -> None:
    """Migration 0004 (issue 10, defect 1): the id every Job's instance label and name are
    made of. One row only; re-running the migration keeps it; the store reads it."""
    (installation,) = [m for m in available_migrations() if m.version == 4]
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM dharma.installation")
        (generated,) = cur.fetchone()
        cur.execute(installation.sql)  # idempotent: no second row, the same id
        cur.execute("SELECT id FROM dharma.installation")
        assert cur.fetchall() == [(generated,)]
        with pytest.raises(psycopg2.IntegrityError):
            cur.execute("INSERT INTO dharma.installation (singleton) VALUES (false)")
        with pytest.raises(psycopg2.IntegrityError):
            cur.execute("INSERT INTO dharma.installation DEFAULT VALUES")
    assert store.installation_id() == uuid.UUID(str(generated))


def test_missing_installation_says_to_migrate(db: Database, store: Store) -> None:
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE dharma.installation")
    with pytest.raises(MissingInstallation, match="dharma-controller migrate"):
        store.installation_id()
    # The failed read did not break the store's connection.
    assert store.owners([]) == {}
    assert store.queue_depth() is not None


def test_queue_depth_counts_live_rows_exactly_and_estimates_a_long_history(
    db: Database, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pending and processing are always exact (their partial indexes); finished rows are
    exact on a small table and, past EXACT_DEPTH_ROWS, read from the planner's statistics, so
    the gauge no longer scans a long history (121 ms at 1M rows before)."""
    counts = {"completed": 1000, "failed": 600, "cancelled": 300, "processing": 40}

    def add(status: str, n: int) -> None:
        with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "WITH m AS (INSERT INTO dharma.media_files (category_id, source_path)"
                " SELECT 'talks', '/uploads/' || g || '.mp4' FROM generate_series(1, %s) g"
                " RETURNING id)"
                " INSERT INTO dharma.stt_jobs (media_id, status, attempts)"
                " SELECT id, %s, CASE WHEN %s = 'pending' THEN 0 ELSE 1 END FROM m",
                (n, status, status),
            )
            conn.commit()

    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        # Statistics change only when this test says so (autovacuum would ANALYZE on its own).
        cur.execute("ALTER TABLE dharma.stt_jobs SET (autovacuum_enabled = false)")
        conn.commit()
    for status_name, n in counts.items():
        add(status_name, n)
    add("pending", 60)
    exact = {JobStatus(s): n for s, n in {**counts, "pending": 60}.items()}
    assert store.queue_depth() == exact

    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("ANALYZE dharma.stt_jobs")
    monkeypatch.setattr("controller.store.EXACT_DEPTH_ROWS", 0)
    assert store.queue_depth() == exact  # ANALYZE sampled every row of a small table
    add("completed", 500)
    add("pending", 5)
    estimated = store.queue_depth()
    assert estimated[JobStatus.PENDING] == 65  # live rows: exact, whatever the statistics
    assert estimated[JobStatus.COMPLETED] == 1000  # history: as of the last ANALYZE
    monkeypatch.setattr("controller.store.EXACT_DEPTH_ROWS", 100_000)
    assert store.queue_depth()[JobStatus.COMPLETED] == 1500
