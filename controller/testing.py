"""Fakes of the service loop's interfaces (controller/executor.py), for tests of one pass.

- `InMemoryStore`: a `QueueStore` that keeps `dharma.stt_jobs` in a dict and applies the same
  rules as queries.sql and the migrations' triggers — the global cap, one run per media,
  priority then age, fencing on (id, attempts, status), success only over the runner's
  commit (`result_attempt`), the re-queue budget (`attempts_base`). The contract suite
  (tests/integration/test_queue_store_contract.py) runs one set of assertions against it and
  against PostgreSQL, so the two cannot drift. Every write is appended to `writes`.
- `FakeExecutor`: an `Executor` whose runners are whatever a test says they are
  (`runners`, `gone`, `fail_launch`); every call that acts is appended to `calls`.
- `FakeClock`, `FakeListener`: time that moves only when told; a wake source that never
  wakes.

Production code never imports this module.
"""

from __future__ import annotations

import datetime as dt
import itertools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controller.executor import EventReason, Launched, LaunchErrors
from controller.jobspec import Instance, LaunchSpec
from controller.model import REASON_CONTROLLER_RESTARTED, JobRow, Observation, Phase, RunnerKey
from controller.reconcile import FailureReason
from controller.store import DatabaseUnavailable
from dharma_common.contract import JobStatus

#: The time every FakeClock starts at.
EPOCH = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
FINAL = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class FakeClock:
    """Wall and monotonic time that advance only through `advance`."""

    def __init__(self, start: dt.datetime = EPOCH) -> None:
        self._now = start
        self._monotonic = 1000.0

    def now(self) -> dt.datetime:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        self._now += dt.timedelta(seconds=seconds)
        self._monotonic += seconds


class FakeListener:
    """A `WakeSource` that never wakes the loop; `failure` is what `problem` reports."""

    def __init__(self) -> None:
        self.started = False
        self.stopped = False
        self.failure: str | None = None

    def start(self, wake: Callable[[], None]) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def problem(self) -> str | None:
        return self.failure


@dataclass
class StoredRow:
    """One row of `dharma.stt_jobs` (the columns the controller reads or writes)."""

    id: int
    media_id: uuid.UUID
    run_after: dt.datetime
    status: JobStatus = JobStatus.PENDING
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 3
    attempts_base: int = 0
    runner_name: str | None = None
    result_attempt: int | None = None
    memory_limit: str | None = None
    processing_started_at: dt.datetime | None = None
    claimed_by: str | None = None
    progress: float | None = None
    finished_at: dt.datetime | None = None
    error_message: str | None = None
    failure_reason: str | None = None
    model: str | None = None

    def job_row(self) -> JobRow:
        return JobRow(
            id=self.id,
            media_id=self.media_id,
            status=self.status,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            runner_name=self.runner_name,
            result_attempt=self.result_attempt,
            memory_limit=self.memory_limit,
            processing_started_at=self.processing_started_at,
            claimed_by=self.claimed_by,
            attempts_base=self.attempts_base,
            model=self.model,
        )


#: One recorded write: the method's name, its arguments, and what it returned.
Write = tuple[Any, ...]


class InMemoryStore:
    """A `QueueStore` in memory (see the module's docstring)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.rows: dict[int, StoredRow] = {}
        self.writes: list[Write] = []
        self.installation = uuid.UUID("00000000-0000-4000-8000-000000000001")
        #: The next this many calls raise DatabaseUnavailable (a lost database).
        self.unavailable = 0
        self.closed = False
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ test set-up ---

    def insert(
        self,
        media_id: uuid.UUID | None = None,
        *,
        priority: int = 0,
        max_attempts: int = 3,
        memory_limit: str | None = None,
        due_in: float = 0.0,
        model: str | None = None,
    ) -> int:
        """A new pending row (its own new media unless `media_id`), as an upload makes."""
        row = StoredRow(
            next(self._ids),
            media_id or uuid.uuid4(),
            run_after=self.clock.now() + dt.timedelta(seconds=due_in),
            priority=priority,
            max_attempts=max_attempts,
            memory_limit=memory_limit,
            model=model,
        )
        self.rows[row.id] = row
        return row.id

    def set_status(self, job_id: int, status: JobStatus) -> None:
        """An operator's `UPDATE ... SET status`: with the re-queue trigger of migration 0003
        (a final row set back to pending starts a new retry budget, its verdict cleared)."""
        row = self.rows[job_id]
        if row.status in FINAL and status is JobStatus.PENDING:
            row.attempts_base = row.attempts
            row.error_message = row.failure_reason = None
        row.status = status

    def commit_result(self, key: RunnerKey) -> bool:
        """The runner's final fenced transaction (jobrunner/queries.sql `mark_result`)."""
        row = self._owned(key)
        if row is None:
            return False
        row.progress, row.result_attempt = 1.0, row.attempts
        return True

    def get(self, job_id: int) -> StoredRow:
        return self.rows[job_id]

    # ------------------------------------------------------------ QueueStore ---

    def _call(self) -> None:
        if self.unavailable > 0:
            self.unavailable -= 1
            raise DatabaseUnavailable("PostgreSQL at in-memory: connection refused")

    def _now(self) -> dt.datetime:
        return self.clock.now()

    def _held(self, row: StoredRow) -> bool:
        """One run per media: another row of its media is processing, or older and pending."""
        return any(
            other.media_id == row.media_id
            and (
                other.status is JobStatus.PROCESSING
                or (other.status is JobStatus.PENDING and other.id < row.id)
            )
            for other in self.rows.values()
        )

    def installation_id(self) -> uuid.UUID:
        self._call()
        return self.installation

    def claim(self, worker: str, batch: int, max_in_flight: int) -> list[JobRow]:
        self._call()
        now = self._now()
        processing = sum(r.status is JobStatus.PROCESSING for r in self.rows.values())
        room = max(0, min(batch, max_in_flight - processing))
        due = [
            r
            for r in self.rows.values()
            if r.status is JobStatus.PENDING and r.run_after <= now and not self._held(r)
        ]
        due.sort(key=lambda r: (-r.priority, r.run_after, r.id))
        claimed = []
        for row in due[:room]:
            row.status = JobStatus.PROCESSING
            row.attempts += 1
            row.processing_started_at = now
            row.claimed_by = worker
            row.progress = row.runner_name = row.finished_at = None
            claimed.append(row.job_row())
        self.writes.append(("claim", worker, [r.id for r in claimed]))
        return claimed

    def inflight(self, owner: str | None) -> list[JobRow]:
        self._call()
        return [
            r.job_row()
            for r in sorted(self.rows.values(), key=lambda r: r.id)
            if r.status is JobStatus.PROCESSING and (owner is None or r.claimed_by == owner)
        ]

    def abandoned(self, owner: str, older_than_seconds: float) -> list[JobRow]:
        self._call()
        cutoff = self._now() - dt.timedelta(seconds=older_than_seconds)
        return [
            r.job_row()
            for r in sorted(self.rows.values(), key=lambda r: r.id)
            if r.status is JobStatus.PROCESSING
            and r.claimed_by != owner
            and r.processing_started_at is not None
            and r.processing_started_at < cutoff
        ]

    def owners(self, job_ids: Sequence[int]) -> dict[int, tuple[JobStatus, int]]:
        if not job_ids:
            return {}
        self._call()
        return {i: (self.rows[i].status, self.rows[i].attempts) for i in job_ids if i in self.rows}

    def queue_depth(self) -> dict[JobStatus, int]:
        self._call()
        depth: dict[JobStatus, int] = {}
        for row in self.rows.values():
            depth[row.status] = depth.get(row.status, 0) + 1
        return depth

    def oldest_pending_age(self) -> float:
        self._call()
        now = self._now()
        due = [
            r.run_after
            for r in self.rows.values()
            if r.status is JobStatus.PENDING and r.run_after <= now
        ]
        return (now - min(due)).total_seconds() if due else 0.0

    def next_due(self) -> float | None:
        self._call()
        due = [
            r.run_after
            for r in self.rows.values()
            if r.status is JobStatus.PENDING and not self._held(r)
        ]
        return (min(due) - self._now()).total_seconds() if due else None

    def _owned(self, key: RunnerKey) -> StoredRow | None:
        row = self.rows.get(key.job_id)
        if row is None or row.status is not JobStatus.PROCESSING or row.attempts != key.attempt:
            return None
        return row

    def _fenced(self, key: RunnerKey, committed: bool | None) -> StoredRow | None:
        """The row if `key` still owns it (and, if `committed` is given, only when the
        runner's commit is there (True) or is not (False))."""
        self._call()
        row = self._owned(key)
        if row is None or committed is None:
            return row
        return row if (row.result_attempt == key.attempt) is committed else None

    def set_runner_name(self, key: RunnerKey, runner_name: str) -> bool:
        row = self._fenced(key, None)
        if row is not None:
            row.runner_name = runner_name
        self.writes.append(("set_runner_name", key, runner_name, row is not None))
        return row is not None

    def record_success(self, key: RunnerKey) -> bool:
        row = self._fenced(key, True)
        if row is not None:
            row.status, row.finished_at, row.progress = JobStatus.COMPLETED, self._now(), 1.0
            row.error_message = row.failure_reason = None
        self.writes.append(("record_success", key, row is not None))
        return row is not None

    def record_failure(self, key: RunnerKey, reason: FailureReason, message: str) -> bool:
        row = self._fenced(key, False)
        if row is not None:
            row.status, row.finished_at = JobStatus.FAILED, self._now()
            row.error_message, row.failure_reason = message, reason.value
        self.writes.append(("record_failure", key, reason, message, row is not None))
        return row is not None

    def record_retry(
        self,
        key: RunnerKey,
        reason: FailureReason,
        message: str,
        delay: float,
        memory_limit: str | None,
    ) -> bool:
        row = self._fenced(key, False)
        if row is not None:
            row.status = JobStatus.PENDING
            row.run_after = self._now() + dt.timedelta(seconds=delay)
            row.error_message, row.failure_reason = message, reason.value
            row.memory_limit = memory_limit or row.memory_limit
        self.writes.append(
            ("record_retry", key, reason, message, delay, memory_limit, row is not None)
        )
        return row is not None

    def close(self) -> None:
        self.closed = True


def runner_name(key: RunnerKey) -> str:
    """The name FakeExecutor gives the runner of `key`."""
    return f"runner-{key.job_id}-{key.attempt}"


@dataclass
class FakeExecutor:
    """An `Executor` that runs nothing: a test sets what it observes and records what the
    loop asks of it.

    - `runners`: what `observe` reports per attempt (Phase.NONE when absent); a successful
      launch adds a PENDING runner, `delete` removes it (unless `slow_stops`);
    - `slow_stops`: `delete` leaves the runner as it was, as a Job's deletion reaches the
      Kubernetes executor's cache only with the watch's next event and a local runner ends
      only after its SIGTERM; the test ends it (`runners.pop`);
    - `refuse_delete`: attempts whose stop cannot be asked for (`delete` returns False);
    - `gone`: what `verify_gone` reports (default: DELETED);
    - `fail_launch`: launches that fail, with the result to return;
    - `finished`: attempts whose outcome the executor keeps until `forget`;
    - `abandoned`: what `observe_abandoned` reports (default: FAILED, ControllerRestarted);
    - `calls`: ("launch", [keys]), ("verify_gone", key), ("delete", key), ("forget", key),
      ("bind", instance), ("start",), ("shutdown",) in order;
    - `events`: (key, reason, message) of each `record_event`, in order (apart from `calls`,
      so tables of calls need not list them).
    """

    clock: FakeClock = field(default_factory=FakeClock)
    kind: str = "fake"
    owner: str | None = None
    abandoned_after: float | None = None
    runners: dict[RunnerKey, Observation] = field(default_factory=dict)
    gone: dict[RunnerKey, Observation] = field(default_factory=dict)
    fail_launch: dict[RunnerKey, Launched] = field(default_factory=dict)
    finished: list[RunnerKey] = field(default_factory=list)
    slow_stops: bool = False
    refuse_delete: set[RunnerKey] = field(default_factory=set)
    abandoned: dict[int, Observation] = field(default_factory=dict)
    stopped_on_shutdown: list[RunnerKey] = field(default_factory=list)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[RunnerKey, EventReason, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    is_synced: bool = True

    def __post_init__(self) -> None:
        self._launch_errors = LaunchErrors(self.clock.now)

    def bind(self, instance: Instance) -> None:
        self.calls.append(("bind", instance))

    def start(self, wake: Callable[[], None]) -> None:
        self.calls.append(("start",))

    def synced(self) -> bool:
        return self.is_synced

    def problems(self) -> list[str]:
        return list(self.failures)

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        keys = [RunnerKey(s.job_id, s.attempt) for s in specs]
        self.calls.append(("launch", keys))
        results = []
        for key in keys:
            result = self.fail_launch.get(key) or Launched(key, runner_name(key))
            if result.runner_name is not None:
                self.runners.setdefault(
                    key,
                    Observation(Phase.PENDING, runner_name=result.runner_name,
                                since=self.clock.now()),
                )  # fmt: skip
            self._launch_errors.note(result)
            results.append(result)
        return results

    def observe(self, key: RunnerKey) -> Observation:
        seen = self.runners.get(key)
        if seen is not None:
            return seen
        return self._launch_errors.get(key) or Observation(Phase.NONE)

    def observe_abandoned(self, row: JobRow) -> Observation:
        default = Observation(
            Phase.FAILED, runner_name=row.runner_name, reason=REASON_CONTROLLER_RESTARTED,
            message=f"abandoned: claimed by controller {row.claimed_by!r}",
        )  # fmt: skip
        return self.abandoned.get(row.id, default)

    def verify_gone(self, key: RunnerKey, runner_name: str) -> Observation:
        self.calls.append(("verify_gone", key))
        default = Observation(Phase.DELETED, runner_name=runner_name, deleted_kind="runner")
        return self.gone.get(key, default)

    def alive(self) -> list[RunnerKey]:
        return sorted(
            k for k, seen in self.runners.items() if seen.phase in (Phase.PENDING, Phase.RUNNING)
        )

    def finished_unclaimed(self) -> list[RunnerKey]:
        return list(self.finished)

    def delete(self, key: RunnerKey) -> bool:
        self.calls.append(("delete", key))
        if key in self.refuse_delete:
            return False
        self._launch_errors.forget(key)
        if not self.slow_stops:
            self.runners.pop(key, None)
        return True

    def forget(self, key: RunnerKey) -> None:
        self.calls.append(("forget", key))
        self._launch_errors.forget(key)
        if key in self.finished:
            self.finished.remove(key)

    def shutdown(self) -> list[RunnerKey]:
        self.calls.append(("shutdown",))
        for key in self.stopped_on_shutdown:
            seen = self.runners.get(key, Observation(Phase.RUNNING, runner_name=runner_name(key)))
            self.runners[key] = replace(seen, phase=Phase.FAILED, exit_code=143, reason="Error")
            if key not in self.finished:
                self.finished.append(key)
        return list(self.stopped_on_shutdown)

    def record_event(self, key: RunnerKey, reason: EventReason, message: str) -> None:
        self.events.append((key, reason, message))
