"""The controller's only door to PostgreSQL (every statement is named in queries.sql).

Each method is one short transaction: nothing is held open while a job runs, so a restart of
the database costs the controller one failed call (`DatabaseUnavailable`), after which the
next call reconnects. Every status write is fenced on the attempt's token and reports whether
it took effect, so a caller can tell "recorded" from "the row was no longer ours".
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extras

from controller.model import JobRow, RunnerKey
from controller.reconcile import FailureReason
from dharma_common.contract import JobStatus
from dharma_common.errors import first_line
from dharma_common.settings import DatabaseSettings
from dharma_common.sqlfile import load_queries

Q = load_queries("controller", "queries.sql")
psycopg2.extras.register_uuid()  # type: ignore[no-untyped-call]
log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key of the claim transaction ("dhmc").
CLAIM_LOCK_KEY = 0x6468_6D63
#: Up to this many rows (the planner's estimate) the queue gauge counts finished rows
#: exactly: a sequential scan of ~10 ms at 100,000 rows (bench/queries.py), every
#: QUEUE_METRICS_INTERVAL_SECONDS. Beyond, it estimates them from the table's statistics.
EXACT_DEPTH_ROWS = 100_000


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or dropped the connection; retry later."""


class MissingInstallation(Exception):
    """The database has no installation identity (not migrated); retry after `migrate`."""


def _row(values: Sequence[Any]) -> JobRow:
    (job_id, media_id, status, attempts, max_attempts, runner_name, result_attempt,
     memory_limit, started, claimed_by, attempts_base, model) = values  # fmt: skip
    return JobRow(
        id=job_id,
        media_id=media_id if isinstance(media_id, uuid.UUID) else uuid.UUID(str(media_id)),
        status=JobStatus(status),
        attempts=attempts,
        max_attempts=max_attempts,
        runner_name=runner_name,
        result_attempt=result_attempt,
        memory_limit=memory_limit,
        processing_started_at=started,
        claimed_by=claimed_by,
        attempts_base=attempts_base,
        model=model,
    )


def read_queue_depth(cur: Any) -> tuple[dict[JobStatus, int], bool]:
    """Rows per status (statuses with none left out) on an open cursor, and whether the
    finished ones were counted exactly (see `Store.queue_depth`; the status page shares it)."""
    cur.execute(Q["queue_depth_live"])
    pending, processing, size = cur.fetchone()
    depth = {JobStatus.PENDING: pending, JobStatus.PROCESSING: processing}
    exact = size is None or size < EXACT_DEPTH_ROWS  # -1: never analysed
    cur.execute(Q["queue_depth_finished" if exact else "queue_depth_finished_estimate"])
    depth.update((JobStatus(status), count) for status, count in cur.fetchall())
    return {status: count for status, count in depth.items() if count}, exact


class Store:
    """The `QueueStore` of controller/executor.py on PostgreSQL. One connection, reopened on
    demand; not thread-safe (the service loop owns it)."""

    def __init__(self, settings: DatabaseSettings, application_name: str) -> None:
        self._settings = settings
        self._application_name = application_name
        self._conn: Any = None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _tx(self, single: bool = False) -> Iterator[Any]:
        """A cursor in one transaction; connection errors become DatabaseUnavailable.

        `single`: the caller runs one statement, which PostgreSQL makes atomic by itself, so
        it runs in autocommit mode — one round trip instead of three (psycopg2 sends BEGIN,
        the statement and COMMIT separately). At 20 Jobs/s that is two fenced writes per Job
        and two reads per pass (docs/performance.md, "Steady-state CPU")."""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg2.connect(
                    **self._settings.connect_kwargs(self._application_name)
                )
            self._conn.autocommit = single
            with self._conn, self._conn.cursor() as cur:
                yield cur
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(
                f"PostgreSQL at {self._settings.describe()}: {first_line(exc)}"
            ) from None

    # ---------------------------------------------------------------- claiming ---

    def claim(self, worker: str, batch: int, max_in_flight: int) -> list[JobRow]:
        """Claim up to `batch` due rows without exceeding `max_in_flight` globally."""
        with self._tx() as cur:
            cur.execute(Q["claim_lock"], {"lock_key": CLAIM_LOCK_KEY})
            cur.execute(
                Q["claim"], {"worker": worker, "batch": batch, "max_in_flight": max_in_flight}
            )
            return [_row(r) for r in cur.fetchall()]

    # ---------------------------------------------------------------- reading ---

    def installation_id(self) -> uuid.UUID:
        """This database's installation id (migration 0004; see controller/jobspec.py
        `Instance`). A database without it has not been migrated: say so, do not guess."""
        try:
            with self._tx(single=True) as cur:
                cur.execute(Q["installation"])
                row = cur.fetchone()
        except psycopg2.errors.UndefinedTable:
            row = None
        if row is None:
            raise MissingInstallation(
                f"PostgreSQL at {self._settings.describe()} has no dharma.installation row: "
                "run `dharma-controller migrate` (migration 0004) first"
            )
        value = row[0]
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))

    def inflight(self, owner: str | None) -> list[JobRow]:
        """Processing rows: all of them (owner None) or those claimed by `owner`."""
        with self._tx(single=True) as cur:
            cur.execute(Q["inflight"], {"owner": owner})
            return [_row(r) for r in cur.fetchall()]

    def abandoned(self, owner: str, older_than_seconds: float) -> list[JobRow]:
        with self._tx(single=True) as cur:
            cur.execute(Q["abandoned"], {"owner": owner, "older_than": older_than_seconds})
            return [_row(r) for r in cur.fetchall()]

    def owners(self, job_ids: Sequence[int]) -> dict[int, tuple[JobStatus, int]]:
        """job id -> (status, attempts) for the rows that still exist."""
        if not job_ids:
            return {}
        with self._tx(single=True) as cur:
            cur.execute(Q["ownership"], {"ids": list(job_ids)})
            return {
                job_id: (JobStatus(status), attempts) for job_id, status, attempts in cur.fetchall()
            }

    def queue_depth(self) -> dict[JobStatus, int]:
        """Rows per status: pending and processing exactly; finished ones exactly while the
        table holds fewer than EXACT_DEPTH_ROWS rows, estimated from statistics beyond."""
        with self._tx() as cur:
            return read_queue_depth(cur)[0]

    def oldest_pending_age(self) -> float:
        with self._tx(single=True) as cur:
            cur.execute(Q["oldest_pending_age"])
            return float(cur.fetchone()[0])

    def next_due(self) -> float | None:
        """Seconds until the next pending row is claimable (<= 0: now), None if none."""
        with self._tx(single=True) as cur:
            cur.execute(Q["next_due"])
            value = cur.fetchone()[0]
            return None if value is None else float(value)

    # ---------------------------------------------------------------- fenced writes ---

    def _fenced(self, query: str, key: RunnerKey, **params: Any) -> bool:
        with self._tx(single=True) as cur:
            cur.execute(Q[query], {"job_id": key.job_id, "attempt": key.attempt, **params})
            return bool(cur.rowcount)

    def set_runner_name(self, key: RunnerKey, runner_name: str) -> bool:
        return self._fenced("set_runner_name", key, runner_name=runner_name)

    def record_success(self, key: RunnerKey) -> bool:
        return self._fenced("record_success", key)

    def record_failure(self, key: RunnerKey, reason: FailureReason, message: str) -> bool:
        return self._fenced("record_failure", key, reason=reason.value, message=message)

    def record_retry(
        self,
        key: RunnerKey,
        reason: FailureReason,
        message: str,
        delay: float,
        memory_limit: str | None,
    ) -> bool:
        return self._fenced(
            "record_retry", key, reason=reason.value, message=message, delay=delay,
            memory_limit=memory_limit,
        )  # fmt: skip
