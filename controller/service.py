"""The service loop: claim, launch, observe, decide, record — one pass at a time.

A pass runs whenever something may have changed: a NOTIFY (a row became pending or
cancelled), an executor event (a Job or pod changed, a process exited), the next retry
becoming due, or the safety-net timer (POLL_INTERVAL_SECONDS). Every pass is a full
comparison — all owned rows against the observed runners, and all runners against their
rows — so a missed event is caught by the next pass; there is no separate resync. Each pass

1. reconciles every row the controller owns (`processing`) with its runner's observed state
   through the pure rules in reconcile.py, and records outcomes (fenced);
2. stops runners whose row moved on (cancelled, retried, finished: the "sweep");
3. claims due rows up to the global cap and launches their runners.

Everything the loop knows is re-derived from PostgreSQL and the executor each pass, so a
restart at any instant loses nothing: claimed rows without a runner are launched (the
deterministic runner name makes that exactly-once), runners found without their name on the
row are adopted, and finished runners are recorded. Only the leader (LEADER_ELECTION) acts;
a standby keeps its watch cache warm. A lost database is survived by retrying passes with
backoff; runners keep running meanwhile and are recorded once it is back.

The loop is written against small interfaces (controller/executor.py): a `QueueStore`, an
`Executor`, a `WakeSource` and a `Clock`, so one pass can be run against the fakes of
controller/testing.py (tests/unit/test_service_pass.py). It never asks which executor it
has: what differs between them (launch-error memory, the local executor's abandoned rows
and its shutdown) is in the executors and reaches the loop as observations.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from controller.executor import (
    Clock,
    EventReason,
    Executor,
    Launched,
    QueueStore,
    SystemClock,
    WakeSource,
)
from controller.faults import Fault, FaultHooks
from controller.jobspec import Instance, LaunchSpec, memory
from controller.listener import Listener
from controller.metrics import Health, Metrics, ProbeServer
from controller.model import JobRow, Observation, Phase, RunnerKey, StopReason
from controller.reconcile import (
    Action,
    Failure,
    Launch,
    Retry,
    Succeed,
    Verify,
    Wait,
    decide,
    plan_failure,
)
from controller.settings import ControllerSettings
from controller.store import DatabaseUnavailable, MissingInstallation, Store
from controller.threads import Backoff, TokenBucket
from dharma_common.contract import JobStatus
from dharma_common.logs import log_context

log = logging.getLogger("controller")


class Leadership(Protocol):
    """Leader election (controller/lease.py); without it this replica always acts."""

    def start(self, wake: Callable[[], None]) -> None: ...
    def is_leader(self) -> bool: ...
    def problem(self) -> str | None: ...
    def stop(self) -> None: ...


#: Passes a quiet controller may run back to back before MIN_PASS_INTERVAL_SECONDS applies.
PASS_BURST = 10

#: How long a runner the loop asked to stop is left to stop before it is asked again. A
#: deleted Job leaves the Kubernetes executor's cache with the watch's next event, a local
#: runner after its SIGTERM grace (LOCAL_TERMINATION_GRACE_SECONDS); until then the passes
#: still see it. Asking again only repairs a cache that missed the deletion (as Kubernetes
#: controllers' "expectations" expire).
STOP_PATIENCE_SECONDS = 120.0


def pass_budget(interval: float, clock: Callable[[], float] = time.monotonic) -> TokenBucket | None:
    """The loop's passes as a token bucket: one pass per `interval` under a steady stream of
    wake-ups, bursts of PASS_BURST after a quiet spell; None (a pass per wake-up) for 0.

    Why: at 20 rows/s every row NOTIFYs and every Job brings a dozen watch events, and a
    pass per wake-up cost most of the controller's CPU (docs/performance.md, "Steady-state
    CPU"). A delay after every wake-up (the earlier debounce) or a fixed spacing between
    passes coalesces them too, but also delays the next step of a lone job — claim, launch,
    record — whenever it follows a pass closely; the bucket delays only a controller that
    has been passing more often than once per `interval` for a while."""
    return TokenBucket(1 / interval, PASS_BURST, clock) if interval > 0 else None


class Service:
    """The loop. Without `store`, `listener` and `clock` it builds the production ones
    (PostgreSQL `Store`, LISTEN `Listener`, the system clock); `jitter` spreads retries;
    `faults` are the test-only crash points of controller/faults.py (None in production)."""

    def __init__(
        self,
        settings: ControllerSettings,
        executor: Executor,
        *,
        store: QueueStore | None = None,
        listener: WakeSource | None = None,
        clock: Clock | None = None,
        jitter: Callable[[], float] = random.random,
        leader: Leadership | None = None,
        exit_when_idle: bool = False,
        metrics: Metrics | None = None,
        faults: FaultHooks | None = None,
    ) -> None:
        self.settings = settings
        self.executor = executor
        self.leader = leader
        self.exit_when_idle = exit_when_idle
        self.identity = settings.identity()
        self.metrics = metrics or Metrics()
        self.health = Health(liveness_window=max(60.0, 3 * settings.POLL_INTERVAL_SECONDS))
        self.store: QueueStore = (
            Store(settings, f"dharma-controller {self.identity}") if store is None else store
        )
        self.clock: Clock = SystemClock() if clock is None else clock
        self._jitter = jitter
        self._faults = faults
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._next_queue_metrics = 0.0
        #: Runners asked to stop, and when (monotonic): see `_stop`.
        self._stops: dict[RunnerKey, float] = {}
        self._listener: WakeSource = (
            Listener(settings, f"dharma-controller-listen {self.identity}")
            if listener is None
            else listener
        )
        self._probes: ProbeServer | None = None
        # Every background thread the loop relies on fails the probes when it dies.
        self.health.add_check(lambda: next(iter(self.executor.problems()), None))
        self.health.add_check(self._listener.problem)
        if leader is not None:
            self.health.add_check(leader.problem)

    # ------------------------------------------------------------------ control ---

    def wake(self) -> None:
        self._wake.set()

    def request_stop(self) -> None:
        """SIGTERM: finish the current pass, claim nothing more, exit."""
        self._stopping.set()
        self._wake.set()

    @property
    def probe_port(self) -> int | None:
        return self._probes.port if self._probes else None

    def run(self) -> int:
        """Serve until stopped (or idle, with exit_when_idle). Returns the exit status."""
        if self.settings.METRICS_PORT:
            self._probes = ProbeServer(self.settings.METRICS_PORT, self.metrics, self.health)
            self._probes.start()
        log.info(
            "controller starting",
            extra={
                "action": "controller_starting",
                "executor": self.executor.kind,
                "identity": self.identity,
                "database": self.settings.describe(),
                "max_concurrent_jobs": self.settings.MAX_CONCURRENT_JOBS,
            },
        )
        try:
            if self._bind_instance():
                self.executor.start(self.wake)
                if self.leader is not None:
                    self.leader.start(self.wake)
                self._listener.start(self.wake)
                self._loop()
        finally:
            self._shutdown()
        return 0

    def _bind_instance(self) -> bool:
        """Scope the executor to this installation (INSTANCE_NAME and the database's id,
        controller/jobspec.py `Instance`) before it watches anything: which Jobs are ours is
        decided by the database we serve, so it is read first. Retried while the database is
        unreachable or not migrated yet (the probes say why); False if stopped meanwhile."""
        backoff = Backoff(first=0.5, cap=30.0)
        while not self._stopping.is_set():
            self.health.beat()
            try:
                installation = self.store.installation_id()
            except (DatabaseUnavailable, MissingInstallation) as exc:
                self.health.not_ready = str(exc)
                log.warning(
                    "installation id not readable; retrying",
                    extra={
                        "action": "installation_unreadable",
                        "error": str(exc),
                        "retry_in_seconds": backoff.delay,
                    },
                )
                backoff.wait(self._stopping)
                continue
            instance = Instance(self.settings.INSTANCE_NAME, installation)
            self.executor.bind(instance)
            log.info(
                "serving installation",
                extra={"action": "installation_bound", "instance": instance.label},
            )
            return True
        return False

    def _loop(self) -> None:
        backoff = Backoff(first=0.5, cap=30.0)
        timeout = 0.0
        budget = pass_budget(self.settings.MIN_PASS_INTERVAL_SECONDS)
        while not self._stopping.is_set():
            self._wake.wait(timeout)
            while budget is not None and not budget.take() and not self._stopping.is_set():
                # Coalesce: the wake-ups that arrive meanwhile land in the coming pass.
                self._stopping.wait(budget.delay())
            self._wake.clear()
            self.health.beat()
            if self._stopping.is_set():
                break
            if not self.executor.synced():
                self.health.not_ready = f"{self.executor.kind} executor has not synced yet"
                timeout = 0.5
                continue
            try:
                idle, next_due = self.run_pass()
            except DatabaseUnavailable as exc:
                self.metrics.db_errors.inc()
                self.health.not_ready = f"database unavailable: {exc}"
                log.warning(
                    "database unavailable; retrying",
                    extra={
                        "action": "database_unavailable",
                        "error": str(exc),
                        "retry_in_seconds": backoff.delay,
                    },
                )
                backoff.wait(self._stopping)
                timeout = 0.0
                continue
            except Exception:
                # A bug or an unexpected API answer must not kill the service: say so, back
                # off, and try again with fresh state (everything is re-read each pass).
                log.exception("reconcile pass failed; retrying", extra={"action": "pass_failed"})
                backoff.wait(self._stopping)
                timeout = 0.0
                continue
            backoff.reset()
            self.health.not_ready = None
            if idle:
                log.info(
                    "queue drained and nothing in flight; exiting (--exit-when-idle)",
                    extra={"action": "queue_drained"},
                )
                return
            timeout = self.settings.POLL_INTERVAL_SECONDS
            if next_due is not None:
                timeout = max(0.05, min(timeout, next_due + 0.05))

    def _shutdown(self) -> None:
        log.info("controller stopping", extra={"action": "controller_stopping"})
        self._listener.stop()
        if self.leader is not None:
            self.leader.stop()
        stopped = set(self.executor.shutdown())
        if stopped:
            # Runners the executor stopped (local: its children): record their outcomes now.
            try:
                for row in self.store.inflight(self.executor.owner):
                    if row.key in stopped:
                        self._reconcile(row, launch=False)
            except DatabaseUnavailable as exc:
                log.warning(
                    "outcomes not recorded at shutdown",
                    extra={"action": "shutdown_outcomes_not_recorded", "error": str(exc)},
                )
        self.store.close()
        if self._probes is not None:
            self._probes.stop()
        log.info("controller stopped", extra={"action": "controller_stopped"})

    # ------------------------------------------------------------------ one pass ---

    def run_pass(self) -> tuple[bool, float | None]:
        """Reconcile, sweep, claim. Returns (idle, seconds until the next retry is due)."""
        self.metrics.passes.inc()
        leading = self.leader is None or self.leader.is_leader()
        self.metrics.leader.set(1 if leading else 0)
        self._queue_metrics()
        if not leading:
            return False, None
        rows = self.store.inflight(self.executor.owner)
        for row in rows:
            self._reconcile(row)
        self._rescue_abandoned()
        # Computed once per pass: on the Kubernetes executor this walks every cached Job and
        # its pods, the largest CPU cost of a pass at high throughput.
        alive = self.executor.alive()
        self._sweep({row.key for row in rows}, alive)
        claimed = not self._stopping.is_set()
        if claimed:
            self._claim()
        self.metrics.in_flight.set(len(alive))
        next_due = self.store.next_due()
        idle = False
        if self.exit_when_idle:
            # Drained: no pending row at all (a retry waiting for its backoff still counts,
            # or the demo would exit with its job half done), and nothing in flight.
            idle = (
                next_due is None
                and not self.store.inflight(self.executor.owner)
                and not alive
                and not self.executor.finished_unclaimed()
            )
        if claimed and next_due is not None and next_due <= 0:
            # Due rows the claim just left: the cap is reached. A runner's end wakes the
            # loop (its watch event or NOTIFY), so waiting for "due now" would only spin.
            next_due = None
        return idle, next_due

    def _queue_metrics(self) -> None:
        now = self.clock.monotonic()
        if now < self._next_queue_metrics:
            return
        self._next_queue_metrics = now + self.settings.QUEUE_METRICS_INTERVAL_SECONDS
        depth = self.store.queue_depth()
        for status in JobStatus:
            self.metrics.queue_jobs.labels(status=status.value).set(depth.get(status, 0))
        self.metrics.oldest_pending.set(self.store.oldest_pending_age())

    # ------------------------------------------------------------------ claiming ---

    def _claim(self) -> None:
        while not self._stopping.is_set():
            if self.leader is not None and not self.leader.is_leader():
                return
            rows = self.store.claim(
                self.identity, self.settings.CLAIM_BATCH_SIZE, self.settings.MAX_CONCURRENT_JOBS
            )
            if not rows:
                return
            self.metrics.claims.inc(len(rows))
            for row in rows:
                with log_context(job_id=row.id, media_id=str(row.media_id), attempt=row.attempts):
                    log.info(
                        "claimed", extra={"action": "job_claimed", "memory_limit": row.memory_limit}
                    )
            if self._faults:
                self._faults.crash(Fault.CRASH_AFTER_CLAIM)
            self._launch(rows)
            if len(rows) < self.settings.CLAIM_BATCH_SIZE:
                return

    def _launch(self, rows: list[JobRow]) -> None:
        specs = [LaunchSpec.of(r) for r in rows]
        results = self.executor.launch(specs)
        for row, result in zip(rows, results, strict=True):
            with log_context(job_id=row.id, media_id=str(row.media_id), attempt=row.attempts):
                self._launched(row, result)

    def _launched(self, row: JobRow, result: Launched) -> None:
        """The executor remembers a failed launch (its `observe` reports it, so the pending
        timeout and the invalid/foreign verdicts of reconcile.py apply); the loop counts it."""
        if result.runner_name is None:
            self.metrics.launches.labels(result="error").inc()
            log.warning(
                "runner not launched", extra={"action": "launch_failed", "error": result.error}
            )
            if result.invalid:
                self.wake()  # cannot work (an unknown model): record it now, not next poll
            return
        self.metrics.launches.labels(result="ok").inc()
        if self.store.set_runner_name(row.key, result.runner_name):
            log.info(
                "runner launched",
                extra={"action": "runner_launched", "runner_name": result.runner_name},
            )
            limit = memory(self.settings, LaunchSpec.of(row))[1]
            told = f"attempt {row.attempt_number} of {row.max_attempts}, memory limit {limit}"
            self.executor.record_event(row.key, EventReason.CLAIMED, f"claimed: {told}")
        else:
            log.info(
                "row moved on before its runner was recorded; stopping the runner",
                extra={"action": "launched_row_moved_on", "runner_name": result.runner_name},
            )
            self._stop(row.key, StopReason.ROW_MOVED_ON.value)

    # ------------------------------------------------------------------ reconciling ---

    def _reconcile(self, row: JobRow, launch: bool = True) -> None:
        with log_context(job_id=row.id, media_id=str(row.media_id), attempt=row.attempts):
            key = row.key
            seen = self.executor.observe(key)
            name = seen.runner_name if seen.phase is not Phase.NONE else None
            if name and row.runner_name != name:
                # Created, then the controller died before recording the name: adopt it.
                if self.store.set_runner_name(key, name):
                    log.info(
                        "adopted runner", extra={"action": "runner_adopted", "runner_name": name}
                    )
                row = replace(row, runner_name=name)
            now = self.clock.now()
            action = decide(row, seen, now, self.settings)
            if isinstance(action, Verify):
                seen = self.executor.verify_gone(key, row.runner_name or "")
                action = decide(row, seen, now, self.settings)
                if isinstance(action, Verify):
                    action = Wait("runner not visible yet")
            if isinstance(action, Launch):
                if launch:
                    log.info(
                        "launching the runner of a claimed attempt",
                        extra={"action": "launch_resumed"},
                    )
                    self._launch([row])
            else:
                self._record(row, action)

    def _record(self, row: JobRow, action: Action) -> None:
        if isinstance(action, Succeed):
            self._record_success(row)
        elif isinstance(action, Failure):
            self._record_failure(row, action)

    def _duration(self, row: JobRow) -> float:
        if row.processing_started_at is None:
            return 0.0
        return max(0.0, (self.clock.now() - row.processing_started_at).total_seconds())

    def _record_success(self, row: JobRow) -> None:
        if self._faults:
            self._faults.crash(Fault.CRASH_BEFORE_RECORD)
        if self.store.record_success(row.key):
            self.metrics.outcomes.labels(outcome="success").inc()
            self.metrics.duration.labels(outcome="success").observe(self._duration(row))
            log.info(
                "attempt succeeded",
                extra={"action": "attempt_succeeded", "runner_name": row.runner_name},
            )
            told = f"attempt {row.attempt_number} of {row.max_attempts} succeeded"
            self.executor.record_event(row.key, EventReason.SUCCEEDED, told)
        else:
            log.info("row moved on; success not recorded", extra={"action": "success_not_recorded"})
        self.executor.forget(row.key)

    def _record_failure(self, row: JobRow, failure: Failure) -> None:
        if self._faults:
            self._faults.crash(Fault.CRASH_BEFORE_RECORD)
        plan = plan_failure(row, failure, self.settings, self._jitter())
        reason = plan.reason.value
        if isinstance(plan, Retry):
            recorded = self.store.record_retry(
                row.key, plan.reason, plan.message, plan.delay_seconds, plan.memory_limit
            )
            if recorded:
                self.metrics.retries.labels(reason=reason).inc()
        else:
            recorded = self.store.record_failure(row.key, plan.reason, plan.message)
        if recorded:
            self.metrics.outcomes.labels(outcome=reason).inc()
            self.metrics.duration.labels(outcome=reason).observe(self._duration(row))
            log.warning(
                "attempt failed",
                extra={"action": "attempt_failed", "failure_reason": reason, "error": plan.message,
                       "retry": isinstance(plan, Retry), "runner_name": row.runner_name},
            )  # fmt: skip
            told = EventReason.RETRYING if isinstance(plan, Retry) else EventReason.FAILED
            self.executor.record_event(row.key, told, f"{reason}: {plan.message}")
        else:
            log.info(
                "row moved on; failure not recorded",
                extra={"action": "failure_not_recorded", "failure_reason": reason},
            )
        if failure.delete_runner:
            self._stop(row.key, reason)
        else:
            self.executor.forget(row.key)

    def _stop(self, key: RunnerKey, why: str) -> bool:
        """Ask the executor to stop the runner of `key`, count it under `why`, and remember
        that it was asked: the passes that still see the runner alive (STOP_PATIENCE_SECONDS)
        leave it to stop, so it is deleted, told and counted once. False when the ask failed
        (nothing counted): the sweep of the next pass asks again."""
        if not self.executor.delete(key):
            return False
        self._stops[key] = self.clock.monotonic()
        self.metrics.deleted.labels(why=why).inc()
        return True

    def _rescue_abandoned(self) -> None:
        """Rows another controller claimed so long ago that its runner is certainly gone,
        which this executor cannot see (`Executor.abandoned_after`; local executors only):
        recorded with the outcome the executor reports for them."""
        older_than = self.executor.abandoned_after
        if older_than is None:
            return
        owner = self.executor.owner or self.identity
        for row in self.store.abandoned(owner, older_than):
            seen: Observation = self.executor.observe_abandoned(row)
            with log_context(job_id=row.id, media_id=str(row.media_id), attempt=row.attempts):
                self._record(row, decide(row, seen, self.clock.now(), self.settings))

    def _sweep(self, owned: set[object], runners: list[RunnerKey]) -> None:
        """Stop runners whose row is no longer theirs (cancelled, retried, gone); release the
        state of finished ones. A fenced runner (exit 12) ends here: nothing is recorded."""
        if self._stops:
            now = self.clock.monotonic()
            self._stops = {k: t for k, t in self._stops.items() if now - t < STOP_PATIENCE_SECONDS}
        alive = [k for k in runners if k not in owned and k not in self._stops]
        finished = [k for k in self.executor.finished_unclaimed() if k not in owned]
        if not alive and not finished:
            return
        rows = self.store.owners(sorted({k.job_id for k in alive + finished}))
        for key in alive:
            owner = rows.get(key.job_id)
            if owner == (JobStatus.PROCESSING, key.attempt):
                continue  # claimed after this pass read its rows
            status = owner[0] if owner else None
            why = StopReason.CANCELLED if status is JobStatus.CANCELLED else StopReason.ROW_MOVED_ON
            with log_context(job_id=key.job_id, attempt=key.attempt):
                log.info(
                    "stopping runner: its row is no longer this attempt's",
                    extra={"action": "runner_swept", "row_status": status.value if status else None,
                           "row_attempts": owner[1] if owner else None,
                           "row_deleted": owner is None},
                )  # fmt: skip
                if self._stop(key, why.value) and why is StopReason.CANCELLED:
                    told = "the job was cancelled; stopping its runner"
                    self.executor.record_event(key, EventReason.CANCELLED, told)
        for key in finished:
            if rows.get(key.job_id) != (JobStatus.PROCESSING, key.attempt):
                self.executor.forget(key)
