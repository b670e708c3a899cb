"""The small interfaces of the service loop: whatever runs attempts (`Executor`), the queue
(`QueueStore`), the wake-up hint (`WakeSource`) and time (`Clock`).

`Service` (controller/service.py) receives one of each, so one pass can be run against the
fakes of controller/testing.py and its store writes and executor calls asserted exactly
(tests/unit/test_service_pass.py).

Two executors: `controller.kube.KubernetesExecutor` (one batch/v1 Job per attempt) and
`controller.local.LocalExecutor` (one subprocess per attempt). The loop never learns which:
it launches, observes, and deletes runners by `RunnerKey`, and decides with the pure rules in
controller/reconcile.py.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from controller.jobspec import Instance, LaunchSpec
from controller.model import (
    REASON_FOREIGN,
    REASON_INVALID,
    JobRow,
    Observation,
    Phase,
    RunnerKey,
)
from dharma_common.contract import JobStatus

if TYPE_CHECKING:
    from controller.reconcile import FailureReason


@dataclass(frozen=True)
class Launched:
    """The result of launching one attempt: its runner's name, or why it did not start.

    `invalid` means the request itself was rejected (a bad spec, a forbidden namespace) and
    repeating it cannot help; `foreign` means a runner with this attempt's name exists but
    is not this attempt's (its labels differ), so the attempt fails at once (retried: the next
    attempt has another name); other errors are retried until PENDING_TIMEOUT_SECONDS.
    """

    key: RunnerKey
    runner_name: str | None
    error: str | None = None
    invalid: bool = False
    foreign: bool = False


class EventReason(str, enum.Enum):
    """A decision of the loop about one attempt, told on its runner (`Executor.record_event`):
    the Kubernetes executor posts it as an Event on the attempt's Job (controller/events.py),
    so `kubectl describe job/<runner_name>` tells the attempt's story."""

    CLAIMED = "Claimed"
    RETRYING = "Retrying"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    SUCCEEDED = "Succeeded"

    @property
    def warning(self) -> bool:
        """Events of type Warning (the others are Normal)."""
        return self in (EventReason.RETRYING, EventReason.FAILED)

    @property
    def action(self) -> str:
        """What the controller did (an Event's `action`)."""
        return _EVENT_ACTIONS[self]


_EVENT_ACTIONS = {
    EventReason.CLAIMED: "Launch",
    EventReason.RETRYING: "Retry",
    EventReason.FAILED: "Fail",
    EventReason.CANCELLED: "Cancel",
    EventReason.SUCCEEDED: "Complete",
}


class Executor(Protocol):
    #: "kubernetes" or "local", for logs and metrics.
    kind: str
    #: Rows this executor can see runners for: None = every processing row (Kubernetes, the
    #: leader adopts all), else the `claimed_by` identity (local: only its own children).
    owner: str | None
    #: A processing row claimed by another controller (not `owner`) for longer than this many
    #: seconds has certainly lost its runner (that controller's deadline killed it), and
    #: nobody else will ever finish it: the loop reconciles it with `observe_abandoned`.
    #: None: this executor sees every runner (owner None), so nothing is ever abandoned.
    abandoned_after: float | None

    def bind(self, instance: Instance) -> None:
        """The installation this controller serves (read from the database before `start`):
        only its runners are observed, adopted and deleted."""

    def start(self, wake: Callable[[], None]) -> None:
        """Begin observing; call `wake()` whenever something changed."""

    def synced(self) -> bool:
        """True once the executor's view is complete (a watch cache has listed)."""

    def problems(self) -> list[str]:
        """Why the executor's view is no longer maintained (a background thread died); the
        probes fail with these reasons."""

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        """Start these attempts (idempotent per key)."""

    def observe(self, key: RunnerKey) -> Observation:
        """What is known about the runner of `key` (Phase.NONE if nothing). For an attempt
        whose launch failed and has not been retried successfully since, Phase.NONE with
        the first failure's time, the error and its reason (`LaunchErrors`)."""

    def observe_abandoned(self, row: JobRow) -> Observation:
        """The outcome of an abandoned row's attempt (see `abandoned_after`)."""

    def verify_gone(self, key: RunnerKey, runner_name: str) -> Observation:
        """Ask the source of truth about a recorded runner that `observe` does not see:
        Phase.DELETED if it is really gone, else what it is."""

    def alive(self) -> list[RunnerKey]:
        """Runners that have not finished (the loop stops those whose row moved on)."""

    def finished_unclaimed(self) -> list[RunnerKey]:
        """Finished runners the executor still keeps state for (released via `forget`)."""

    def delete(self, key: RunnerKey) -> bool:
        """Stop and remove the runner of `key` (cancellation, stale attempt, stuck Pending).
        True once the stop is asked for (or nothing is left to stop), though the runner may
        still be observed alive for a while; False when asking failed (the next pass asks
        again)."""

    def forget(self, key: RunnerKey) -> None:
        """The outcome of `key` is recorded (or irrelevant): release local state (including
        the memory of its launch errors)."""

    def shutdown(self) -> list[RunnerKey]:
        """Stop observing. Kubernetes leaves Jobs running (returns []); local stops its
        processes and returns the attempts whose outcomes are to be recorded now."""

    def record_event(self, key: RunnerKey, reason: EventReason, message: str) -> None:
        """Tell what the loop decided about the attempt `key` where its runner is looked at
        (Kubernetes: an Event on its Job). Best effort: never blocks, never raises, may drop."""


class LaunchErrors:
    """What an executor remembers of failed launches, per attempt, until one succeeds or the
    attempt's outcome is recorded: `observe` reports it as Phase.NONE with the first
    failure's time (the pending timeout counts from it), the error and, for a launch that
    cannot work, REASON_INVALID or REASON_FOREIGN. Thread-safe (launches may run in a pool)."""

    def __init__(self, now: Callable[[], dt.datetime] | None = None) -> None:
        self._now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        self._errors: dict[RunnerKey, Observation] = {}
        self._lock = threading.Lock()

    def note(self, result: Launched) -> None:
        """Remember a failed launch (keeping the time of the first), forget a good one."""
        with self._lock:
            if result.runner_name is not None:
                self._errors.pop(result.key, None)
                return
            known = self._errors.get(result.key)
            reason = (
                REASON_INVALID if result.invalid else REASON_FOREIGN if result.foreign else None
            )
            self._errors[result.key] = Observation(
                Phase.NONE,
                since=known.since if known else self._now(),
                message=result.error or "unknown error",
                reason=reason,
            )

    def get(self, key: RunnerKey) -> Observation | None:
        with self._lock:
            return self._errors.get(key)

    def forget(self, key: RunnerKey) -> None:
        with self._lock:
            self._errors.pop(key, None)


class QueueStore(Protocol):
    """The queue (`dharma.stt_jobs`) as the service loop uses it: controller/store.py `Store`
    (PostgreSQL, every statement in queries.sql) or controller/testing.py `InMemoryStore`
    (the same rules in memory; tests/integration/test_queue_store_contract.py holds both to
    one set of assertions). Reads may raise `controller.store.DatabaseUnavailable`.

    Every write is fenced on the attempt's token: it takes effect only while the row is
    `processing` at `key.attempt`, and returns whether it did. `record_success` needs the
    runner's commit (`result_attempt == key.attempt`); failures and retries never overwrite
    it."""

    def installation_id(self) -> uuid.UUID: ...
    def claim(self, worker: str, batch: int, max_in_flight: int) -> list[JobRow]:
        """Claim up to `batch` due rows without exceeding `max_in_flight` processing rows
        globally: priority first, then the longest-waiting; a pending row only when no row
        of its media is processing and no older row of its media is pending."""

    def inflight(self, owner: str | None) -> list[JobRow]:
        """Processing rows (by id): all of them (owner None), or those `owner` claimed."""

    def abandoned(self, owner: str, older_than_seconds: float) -> list[JobRow]:
        """Processing rows claimed by another owner longer than `older_than_seconds` ago."""

    def owners(self, job_ids: Sequence[int]) -> dict[int, tuple[JobStatus, int]]:
        """job id -> (status, attempts) for the rows that still exist."""

    def queue_depth(self) -> dict[JobStatus, int]: ...
    def oldest_pending_age(self) -> float: ...
    def next_due(self) -> float | None:
        """Seconds until the next claimable pending row is due (<= 0: now), None if none."""

    def set_runner_name(self, key: RunnerKey, runner_name: str) -> bool: ...
    def record_success(self, key: RunnerKey) -> bool: ...
    def record_failure(self, key: RunnerKey, reason: FailureReason, message: str) -> bool: ...
    def record_retry(
        self,
        key: RunnerKey,
        reason: FailureReason,
        message: str,
        delay: float,
        memory_limit: str | None,
    ) -> bool:
        """Back to pending, due after `delay` seconds, with a raised memory limit if given."""

    def close(self) -> None: ...


class WakeSource(Protocol):
    """Something that wakes the loop when the queue may have changed (controller/listener.py:
    LISTEN/NOTIFY); a hint only, polling is the safety net."""

    def start(self, wake: Callable[[], None]) -> None: ...
    def stop(self) -> None: ...
    def problem(self) -> str | None:
        """Why wake-ups no longer arrive (a dead thread), else None."""


class Clock(Protocol):
    """Time, as the loop reads it: wall time for ages and timeouts, monotonic time for its
    own schedule."""

    def now(self) -> dt.datetime: ...
    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()
