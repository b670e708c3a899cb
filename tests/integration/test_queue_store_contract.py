"""One contract, two stores: every assertion here runs against the PostgreSQL `Store` and
against controller/testing.py's `InMemoryStore`, so the fake the pass-level tests use
(tests/unit/test_service_pass.py) cannot drift from queries.sql and the migrations'
triggers: the global cap, priority then age, one run per media, fencing on (id, attempts),
success only over the runner's commit, failures never over it, the re-queue budget."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import pytest

from controller.executor import QueueStore
from controller.metrics import Metrics
from controller.migrate import available_migrations
from controller.model import RunnerKey
from controller.reconcile import FailureReason
from controller.store import Store
from controller.testing import InMemoryStore
from devtools.services import Database
from dharma_common.contract import JobStatus

pytestmark = pytest.mark.timeout(60)
TEMPORARY = FailureReason.RUNNER_TEMPORARY


@dataclass(frozen=True)
class Seen:
    """The columns the contract checks, read back from either store."""

    status: JobStatus
    attempts: int
    attempts_base: int
    runner_name: str | None
    error_message: str | None
    failure_reason: str | None
    memory_limit: str | None


class Queue(Protocol):
    """How a test sets up rows and reads them back, on either store."""

    store: QueueStore

    def media(self) -> uuid.UUID: ...
    def insert(
        self,
        media_id: uuid.UUID | None = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        due_in: float = 0.0,
    ) -> int: ...
    def set_status(self, job_id: int, status: JobStatus) -> None: ...
    def commit_result(self, key: RunnerKey) -> None: ...
    def backdate_claim(self, job_id: int, seconds: float) -> None: ...
    def seen(self, job_id: int) -> Seen: ...


class MemoryQueue:
    def __init__(self) -> None:
        self.memory = InMemoryStore()
        self.store: QueueStore = self.memory

    def media(self) -> uuid.UUID:
        return uuid.uuid4()

    def insert(
        self,
        media_id: uuid.UUID | None = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        due_in: float = 0.0,
    ) -> int:
        return self.memory.insert(
            media_id, priority=priority, max_attempts=max_attempts, due_in=due_in
        )

    def set_status(self, job_id: int, status: JobStatus) -> None:
        self.memory.set_status(job_id, status)

    def commit_result(self, key: RunnerKey) -> None:
        assert self.memory.commit_result(key)

    def backdate_claim(self, job_id: int, seconds: float) -> None:
        row = self.memory.get(job_id)
        assert row.processing_started_at is not None
        row.processing_started_at -= dt.timedelta(seconds=seconds)

    def seen(self, job_id: int) -> Seen:
        r = self.memory.get(job_id)
        return Seen(r.status, r.attempts, r.attempts_base, r.runner_name, r.error_message,
                    r.failure_reason, r.memory_limit)  # fmt: skip


class PostgresQueue:
    def __init__(self, db: Database) -> None:
        self.conn: Any = db.connect()
        self.conn.autocommit = True
        self.store: QueueStore = Store(db.settings, "contract")

    def close(self) -> None:
        self.store.close()
        self.conn.close()

    def _one(self, sql: str, *params: Any) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def media(self) -> uuid.UUID:
        value: uuid.UUID = self._one(
            "INSERT INTO dharma.media_files (category_id, source_path)"
            " VALUES ('talks', '/uploads/x.mp4') RETURNING id"
        )[0]
        return value

    def insert(
        self,
        media_id: uuid.UUID | None = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        due_in: float = 0.0,
    ) -> int:
        job_id: int = self._one(
            "INSERT INTO dharma.stt_jobs (media_id, priority, max_attempts, run_after)"
            " VALUES (%s, %s, %s, now() + make_interval(secs => %s)) RETURNING id",
            media_id or self.media(), priority, max_attempts, due_in,
        )[0]  # fmt: skip
        return job_id

    def set_status(self, job_id: int, status: JobStatus) -> None:
        self._one(
            "UPDATE dharma.stt_jobs SET status = %s WHERE id = %s RETURNING id",
            status.value,
            job_id,
        )

    def commit_result(self, key: RunnerKey) -> None:
        assert self._one(
            "UPDATE dharma.stt_jobs SET progress = 1, result_attempt = attempts"
            " WHERE id = %s AND attempts = %s AND status = 'processing' RETURNING id",
            key.job_id, key.attempt,
        )  # fmt: skip

    def backdate_claim(self, job_id: int, seconds: float) -> None:
        self._one(
            "UPDATE dharma.stt_jobs SET processing_started_at ="
            " processing_started_at - make_interval(secs => %s) WHERE id = %s RETURNING id",
            seconds, job_id,
        )  # fmt: skip

    def seen(self, job_id: int) -> Seen:
        row = self._one(
            "SELECT status, attempts, attempts_base, runner_name, error_message,"
            " failure_reason, memory_limit FROM dharma.stt_jobs WHERE id = %s",
            job_id,
        )
        return Seen(JobStatus(row[0]), *row[1:])


@pytest.fixture(params=["postgres", "memory"])
def queue(request: pytest.FixtureRequest) -> Iterator[Queue]:
    if request.param == "memory":
        yield MemoryQueue()
        return
    pg = PostgresQueue(request.getfixturevalue("db"))
    try:
        yield pg
    finally:
        pg.close()


def test_claim_takes_priority_then_age_up_to_the_global_cap(queue: Queue) -> None:
    low, high, old_low = queue.insert(), queue.insert(priority=5), queue.insert()
    claimed = queue.store.claim("a", batch=10, max_in_flight=2)
    assert sorted(r.id for r in claimed) == [low, high]
    assert {(r.status, r.attempts, r.claimed_by, r.runner_name) for r in claimed} == {
        (JobStatus.PROCESSING, 1, "a", None)
    }
    assert queue.store.claim("b", batch=10, max_in_flight=2) == []  # the cap is global
    (last,) = queue.store.claim("b", batch=10, max_in_flight=3)
    assert (last.id, last.claimed_by) == (old_low, "b")


def test_claim_takes_at_most_a_batch(queue: Queue) -> None:
    ids = [queue.insert() for _ in range(3)]
    assert [r.id for r in queue.store.claim("a", batch=2, max_in_flight=10)] == ids[:2]


def test_a_row_not_due_yet_waits(queue: Queue) -> None:
    later = queue.insert(due_in=3600)
    assert queue.store.claim("a", 10, 10) == []
    due = queue.store.next_due()
    assert due is not None and 3500 < due <= 3600
    assert queue.store.oldest_pending_age() == 0.0
    now = queue.insert()
    assert [r.id for r in queue.store.claim("a", 10, 10)] == [now]
    assert queue.seen(later).status is JobStatus.PENDING


def test_one_run_per_media_in_insertion_order(queue: Queue) -> None:
    media = queue.media()
    first = queue.insert(media, due_in=3600)
    second = queue.insert(media)
    other = queue.insert()
    # The older row of the media is pending (not due yet): the newer one waits behind it,
    # and does not count as due either.
    assert [r.id for r in queue.store.claim("a", 10, 10)] == [other]
    due = queue.store.next_due()
    assert due is not None and due > 3500
    queue.set_status(first, JobStatus.CANCELLED)
    (claimed,) = queue.store.claim("a", 10, 10)
    assert claimed.id == second
    third = queue.insert(media)
    assert queue.store.claim("a", 10, 10) == []  # a run of its media is processing
    assert queue.store.next_due() is None
    queue.commit_result(claimed.key)
    assert queue.store.record_success(claimed.key)
    assert [r.id for r in queue.store.claim("a", 10, 10)] == [third]


def test_writes_are_fenced_on_the_attempt(queue: Queue) -> None:
    job = queue.insert()
    (row,) = queue.store.claim("a", 1, 10)
    stale = RunnerKey(job, row.attempts + 1)
    assert not queue.store.set_runner_name(stale, "x")
    assert not queue.store.record_failure(stale, TEMPORARY, "m")
    assert queue.store.set_runner_name(row.key, "runner-1")
    assert queue.seen(job).runner_name == "runner-1"
    assert not queue.store.record_success(row.key)  # no commit by the runner
    assert queue.store.record_retry(row.key, FailureReason.OOM_KILLED, "oom", 0.0, "2Gi")
    seen = queue.seen(job)
    assert (seen.status, seen.error_message, seen.failure_reason, seen.memory_limit) == (
        JobStatus.PENDING, "oom", "oom_killed", "2Gi",
    )  # fmt: skip
    assert not queue.store.record_retry(row.key, TEMPORARY, "again", 0.0, None)
    (again,) = queue.store.claim("a", 1, 10)
    assert again.attempts == 2 and again.runner_name is None and again.memory_limit == "2Gi"
    assert not queue.store.record_failure(row.key, TEMPORARY, "stale")
    assert not queue.store.set_runner_name(row.key, "stale")
    assert queue.store.record_retry(again.key, TEMPORARY, "m", 0.0, None)
    assert queue.seen(job).memory_limit == "2Gi"  # kept when no new limit is given


def test_success_only_over_the_commit_and_failure_never_over_it(queue: Queue) -> None:
    job = queue.insert()
    (row,) = queue.store.claim("a", 1, 10)
    queue.commit_result(row.key)
    assert not queue.store.record_failure(row.key, TEMPORARY, "m")
    assert not queue.store.record_retry(row.key, TEMPORARY, "m", 0.0, None)
    assert queue.store.record_success(row.key)
    assert queue.seen(job).status is JobStatus.COMPLETED
    assert not queue.store.record_success(row.key)  # once
    other = queue.insert()
    (row,) = queue.store.claim("a", 1, 10)
    assert queue.store.record_failure(row.key, FailureReason.RUNNER_PERMANENT, "bad media")
    seen = queue.seen(other)
    assert (seen.status, seen.error_message, seen.failure_reason) == (
        JobStatus.FAILED, "bad media", "runner_error_permanent",
    )  # fmt: skip


@pytest.mark.parametrize("final", [JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.COMPLETED])
def test_a_requeue_from_a_final_status_starts_a_budget(queue: Queue, final: JobStatus) -> None:
    job = queue.insert(max_attempts=1)
    (row,) = queue.store.claim("a", 1, 10)
    assert queue.store.record_failure(row.key, TEMPORARY, "m")
    queue.set_status(job, final)
    queue.set_status(job, JobStatus.PENDING)
    seen = queue.seen(job)
    assert (seen.attempts, seen.attempts_base, seen.error_message, seen.failure_reason) == (
        1, 1, None, None,
    )  # fmt: skip
    (again,) = queue.store.claim("a", 1, 10)
    assert (again.attempts, again.attempt_number) == (2, 1)
    assert not queue.store.record_success(row.key)


def test_a_reset_of_a_processing_row_keeps_its_budget(queue: Queue) -> None:
    job = queue.insert()
    queue.store.claim("a", 1, 10)
    queue.set_status(job, JobStatus.PENDING)
    (again,) = queue.store.claim("a", 1, 10)
    assert (again.attempts, again.attempts_base) == (2, 0)


def test_inflight_abandoned_owners_and_depth(queue: Queue) -> None:
    mine, theirs, old, waiting = (queue.insert() for _ in range(4))
    queue.store.claim("me", 1, 10)
    queue.store.claim("them", 2, 10)
    queue.backdate_claim(old, 7200)
    assert [r.id for r in queue.store.inflight(None)] == [mine, theirs, old]
    assert [r.id for r in queue.store.inflight("me")] == [mine]
    assert [r.id for r in queue.store.abandoned("me", 3600)] == [old]
    assert queue.store.abandoned("them", 3600) == []
    assert queue.store.owners([]) == {}
    assert queue.store.owners([mine, waiting, 10**9]) == {
        mine: (JobStatus.PROCESSING, 1),
        waiting: (JobStatus.PENDING, 0),
    }
    assert queue.store.queue_depth() == {JobStatus.PROCESSING: 3, JobStatus.PENDING: 1}
    assert queue.store.oldest_pending_age() >= 0.0
    due = queue.store.next_due()
    assert due is not None and due <= 0


def test_job_status_is_the_schema_and_the_queries_status_set() -> None:
    """The enum, the CHECK constraint of migration 0001, and every status literal in the
    controller's and the runner's queries name the same statuses."""
    (initial,) = [m for m in available_migrations() if m.version == 1]
    check = re.search(r"CHECK \(status IN \(([^)]*)\)\)", initial.sql)
    assert check is not None
    assert re.findall(r"'(\w+)'", check[1]) == [s.value for s in JobStatus]
    for package in ("controller", "jobrunner"):
        sql = (resources.files(package) / "queries.sql").read_text(encoding="utf-8")
        used = set(re.findall(r"status\s*(?:=|IN \()\s*'(\w+)'", sql))
        assert used, package
        assert used <= {s.value for s in JobStatus}, package
    samples = Metrics().registry.get_sample_value
    assert all(samples("dharma_queue_jobs", {"status": s.value}) == 0 for s in JobStatus)
