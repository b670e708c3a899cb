"""The runner's database session (jobrunner/store.py) against the real PostgreSQL."""

from __future__ import annotations

import pytest

from devtools.services import Database
from jobrunner.store import RunnerStore


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("statement_timeout", "2min"),
        ("lock_timeout", "30s"),
        ("idle_in_transaction_session_timeout", "2min"),
    ],
)
def test_runner_session_has_timeouts(db: Database, name: str, expected: str) -> None:
    """A runner blocked on a lock (a manual transaction, a stuck controller) must fail its
    statement and exit temporary rather than hang until the Job's deadline."""
    store = RunnerStore(db.settings, job_id=1, attempt=1)
    try:
        with store._conn.cursor() as cur:
            cur.execute(f"SHOW {name}")
            assert cur.fetchone()[0] == expected
    finally:
        store.close()
