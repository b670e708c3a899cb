"""The runner's seam to PostgreSQL: load the attempt, write progress, commit results.

All writes are fenced on the attempt's token (job id, attempt number) so that an attempt the
controller has given up on — or a job someone cancelled — can never overwrite a newer
attempt's results (DESIGN.md defect 6). No transaction stays open while media is processed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extras

from dharma_common.contract import JobStatus
from dharma_common.errors import first_line
from dharma_common.settings import DatabaseSettings
from dharma_common.sqlfile import load_queries
from jobrunner.errors import FencedOut, PermanentError, TemporaryError
from jobrunner.subtitles import Segment

Q = load_queries("jobrunner", "queries.sql")

#: Session limits (milliseconds), so a runner blocked on a lock (a manual transaction, a
#: stuck controller) or on a dead server fails its statement as a temporary error instead of
#: hanging until the Job's deadline and holding its row. Fixed rather than settings: the
#: runner's statements are few and of fixed shape, and the longest, the final transaction
#: (the delete and re-insert of a talk's subtitle rows), is short; 120 s leaves it ample
#: slack on a loaded database, so it is not a knob an operator needs. They are longer than
#: the controller's (DB_*_TIMEOUT_SECONDS) because of that final transaction.
SESSION_TIMEOUTS_MS = {
    "statement_timeout": 120_000,
    "lock_timeout": 30_000,
    "idle_in_transaction_session_timeout": 120_000,
}
psycopg2.extras.register_uuid()  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Attempt:
    job_id: int
    attempt: int
    media_id: uuid.UUID
    category_id: str
    created_at: dt.datetime
    source_path: str
    language: str | None
    #: The job's own prompt for whisper (migration 0008); None: WHISPER_PROMPTS decides.
    initial_prompt: str | None = None


class RunnerStore:
    """One connection for the life of one attempt, in autocommit except for the final write."""

    def __init__(self, settings: DatabaseSettings, job_id: int, attempt: int) -> None:
        self.job_id, self.attempt = job_id, attempt
        kwargs = settings.connect_kwargs(f"dharma-jobrunner job={job_id} attempt={attempt}")
        # Startup options: they hold from the first statement, with no extra round trip.
        limits = " ".join(f"-c {name}={ms}" for name, ms in SESSION_TIMEOUTS_MS.items())
        kwargs["options"] = " ".join(filter(None, (kwargs.get("options"), limits)))
        try:
            self._conn: Any = psycopg2.connect(**kwargs)
        except psycopg2.OperationalError as exc:
            raise TemporaryError(
                f"cannot connect to PostgreSQL at {settings.describe()}: {first_line(exc)}"
            ) from None
        self._conn.autocommit = True
        self._token = {"job_id": job_id, "attempt": attempt}

    def close(self) -> None:
        self._conn.close()

    def load(self) -> Attempt:
        """Check the fencing token and read the media row."""
        with _db_errors(), self._conn.cursor() as cur:
            cur.execute(Q["load_attempt"], self._token)
            row = cur.fetchone()
        if row is None:
            raise PermanentError(f"job {self.job_id} does not exist in dharma.stt_jobs")
        status, attempts, language, media_id, category_id, created_at, source_path, prompt = row
        if status != JobStatus.PROCESSING or attempts != self.attempt:
            raise FencedOut(
                f"job {self.job_id} is {status} at attempt {attempts}; attempt {self.attempt} "
                "no longer owns it, so it changes nothing"
            )
        return Attempt(
            self.job_id, self.attempt, media_id, category_id, created_at, source_path, language,
            prompt,
        )  # fmt: skip

    def still_owned(self) -> bool:
        """Cheap fence check before side effects outside the database (uploads)."""
        with _db_errors(), self._conn.cursor() as cur:
            cur.execute(Q["check_attempt"], self._token)
            return cur.fetchone() is not None

    def set_progress(self, progress: float) -> bool:
        """Write progress; False means the row is no longer ours (stop working)."""
        with _db_errors(), self._conn.cursor() as cur:
            cur.execute(Q["set_progress"], {**self._token, "progress": round(progress, 4)})
            return bool(cur.rowcount)

    def commit_results(
        self, media_id: uuid.UUID, segments: list[Segment], duration: float | None
    ) -> None:
        """Replace the media's subtitles and set its duration in ONE fenced transaction."""
        conn = self._conn
        conn.autocommit = False
        try:
            with _db_errors(), conn, conn.cursor() as cur:
                cur.execute(Q["lock_attempt"], self._token)
                if cur.fetchone() is None:
                    raise FencedOut(
                        f"job {self.job_id} attempt {self.attempt} lost ownership before its "
                        "results were written; nothing was changed"
                    )
                media = {"media_id": media_id}
                cur.execute(Q["lock_media"], media)
                cur.execute(Q["delete_subtitles"], media)
                psycopg2.extras.execute_values(
                    cur,
                    Q["insert_subtitles"],
                    [(media_id, s.start_ms, s.end_ms, s.text) for s in segments],
                    page_size=1000,
                )
                cur.execute(Q["set_duration"], {**media, "duration": duration})
                cur.execute(Q["mark_result"], self._token)
        finally:
            conn.autocommit = True


@contextmanager
def _db_errors() -> Iterator[None]:
    """Database outages are temporary; data errors are bad rows (permanent)."""
    try:
        yield
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise TemporaryError(f"database error: {first_line(exc)}") from None
    except (psycopg2.DataError, psycopg2.IntegrityError) as exc:
        raise PermanentError(f"database rejected the data: {first_line(exc)}") from None
