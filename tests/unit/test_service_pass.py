"""One pass of the service loop, against the fakes of controller/testing.py: given these rows
and these observations, the pass makes exactly these store writes and executor calls.

The in-memory store is held to the PostgreSQL store's rules by
tests/integration/test_queue_store_contract.py; the decisions themselves are table-tested in
test_reconcile.py. Here: what the loop does with them (claim, launch, adopt, record, sweep,
Verify, crash recovery, launch errors, abandoned rows, shutdown), with no process, database
or cluster.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.executor import EventReason, Launched
from controller.faults import Fault, FaultHooks
from controller.jobspec import Instance, LaunchSpec
from controller.local import LocalExecutor
from controller.metrics import Metrics
from controller.model import Observation, Phase, RunnerKey
from controller.reconcile import FailureReason
from controller.service import PASS_BURST, STOP_PATIENCE_SECONDS, Service, pass_budget
from controller.settings import ControllerSettings
from controller.testing import FakeClock, FakeExecutor, FakeListener, InMemoryStore, Write
from dharma_common.contract import JobStatus

K11, K21, K31, K12, K13 = (RunnerKey(1, 1), RunnerKey(2, 1), RunnerKey(3, 1),
                           RunnerKey(1, 2), RunnerKey(1, 3))  # fmt: skip
R = FailureReason
BASE: dict[str, Any] = dict(
    DB_HOST="db", DB_USER="u", POD_NAME="ctl", METRICS_PORT=0, MAX_CONCURRENT_JOBS=2,
    RETRY_BASE_SECONDS=10, PENDING_TIMEOUT_SECONDS=300,
)  # fmt: skip
#: What the claim at the end of a pass writes when nothing is due.
NO_CLAIM: Write = ("claim", "ctl", [])


def name(key: RunnerKey) -> str:
    return f"runner-{key.job_id}-{key.attempt}"


class Leader:
    """Leads while `leading`, or for the first `answers` questions only."""

    def __init__(self, leading: bool, answers: int | None = None) -> None:
        self.leading, self.answers = leading, answers
        self.started = self.stopped = False

    def start(self, wake: Callable[[], None]) -> None:
        self.started = True

    def is_leader(self) -> bool:
        if self.answers is not None:
            self.answers -= 1
            return self.answers >= 0
        return self.leading

    def problem(self) -> str | None:
        return None

    def stop(self) -> None:
        self.stopped = True


@dataclass
class World:
    clock: FakeClock
    store: InMemoryStore
    executor: FakeExecutor
    service: Service
    listener: FakeListener = field(default_factory=FakeListener)

    def processing(
        self,
        *,
        attempts: int = 1,
        runner_name: str | None = None,
        committed: bool = False,
        claimed_by: str = "ctl",
        started_ago: float = 60.0,
        max_attempts: int = 3,
    ) -> RunnerKey:
        """A claimed row (the next id), as a pass of some controller left it."""
        job_id = self.store.insert(max_attempts=max_attempts)
        row = self.store.get(job_id)
        row.status, row.attempts, row.claimed_by = JobStatus.PROCESSING, attempts, claimed_by
        row.runner_name = runner_name
        row.processing_started_at = self.clock.now() - dt.timedelta(seconds=started_ago)
        row.result_attempt = attempts if committed else None
        return RunnerKey(job_id, attempts)

    def sees(self, key: RunnerKey, phase: Phase, **details: Any) -> None:
        details.setdefault("runner_name", name(key))
        self.executor.runners[key] = Observation(phase, **details)

    def one_pass(self) -> tuple[list[Write], list[tuple[Any, ...]]]:
        self.store.writes.clear()
        self.executor.calls.clear()
        self.service.run_pass()
        return list(self.store.writes), list(self.executor.calls)


def world(
    executor: type[FakeExecutor] = FakeExecutor,
    executor_args: dict[str, Any] | None = None,
    leading: bool | Leader | None = None,
    exit_when_idle: bool = False,
    faults: FaultHooks | None = None,
    **settings: Any,
) -> World:
    clock = FakeClock()
    store = InMemoryStore(clock)
    fake = executor(clock=clock, **(executor_args or {}))
    listener = FakeListener()
    service = Service(
        ControllerSettings(**{**BASE, **settings}),
        fake,
        store=store,
        listener=listener,
        clock=clock,
        jitter=lambda: 0.0,
        leader=Leader(leading) if isinstance(leading, bool) else leading,
        exit_when_idle=exit_when_idle,
        metrics=Metrics(),
        faults=faults,
    )
    return World(clock, store, fake, service, listener)


def sample(w: World, metric: str, **labels: str) -> float | None:
    return w.service.metrics.registry.get_sample_value(metric, labels)


def retry(key: RunnerKey, reason: FailureReason, message: str, limit: str | None = None) -> Write:
    """The retry write of attempt 1 of 3 (RETRY_BASE_SECONDS 10, no jitter: 5 s)."""
    more = f"; next attempt with memory limit {limit}" if limit else ""
    text = f"{message} (attempt {key.attempt} of 3; retrying in 5 s{more})"
    return ("record_retry", key, reason, text, 5.0, limit, True)


@dataclass(frozen=True)
class Case:
    name: str
    arrange: Callable[[World], object]
    writes: Sequence[Write]
    calls: Sequence[tuple[Any, ...]]
    settings: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)


def _three_pending(w: World) -> None:
    for _ in range(3):
        w.store.insert()


def _running(w: World) -> None:
    w.sees(w.processing(runner_name="runner-1-1"), Phase.RUNNING)


def _unrecorded(w: World) -> None:
    w.sees(w.processing(), Phase.RUNNING)


def _finished(committed: bool, phase: Phase, **details: Any) -> Callable[[World], None]:
    def arrange(w: World) -> None:
        w.sees(w.processing(runner_name="runner-1-1", committed=committed), phase, **details)

    return arrange


def _last_attempt(w: World) -> None:
    key = w.processing(attempts=3, runner_name="runner-1-3")
    w.sees(key, Phase.FAILED, exit_code=11, message="WebDAV 503")


def _stuck(w: World) -> None:
    key = w.processing(runner_name="runner-1-1", started_ago=400)
    since = w.clock.now() - dt.timedelta(seconds=301)
    w.sees(key, Phase.PENDING, since=since, waiting_reason="Unschedulable", message="0/1 nodes")


def _recorded_not_seen(gone: Observation | None) -> Callable[[World], None]:
    def arrange(w: World) -> None:
        key = w.processing(runner_name="runner-1-1")
        if gone is not None:
            w.executor.gone[key] = gone

    return arrange


def _cancelled(w: World) -> None:
    key = w.processing(runner_name="runner-1-1")
    w.store.set_status(key.job_id, JobStatus.CANCELLED)
    w.sees(key, Phase.RUNNING)


def _retried(w: World) -> None:
    key = w.processing(attempts=2, runner_name="runner-1-2")
    w.sees(key, Phase.RUNNING)
    w.sees(K11, Phase.RUNNING)


def _claimed_elsewhere(w: World) -> None:
    w.sees(w.processing(claimed_by="other", runner_name="runner-1-1"), Phase.RUNNING)


def _finished_and_recorded(w: World) -> None:
    key = w.processing(runner_name="runner-1-1")
    w.store.set_status(key.job_id, JobStatus.COMPLETED)
    w.executor.finished.append(key)


def _finished_still_owned(w: World) -> None:
    key = w.processing(runner_name="runner-1-1")
    w.sees(key, Phase.RUNNING)
    w.executor.finished.append(key)


def _finished_claimed_elsewhere(w: World) -> None:
    w.executor.finished.append(w.processing(claimed_by="other", runner_name="runner-1-1"))


def _launch_fails(w: World) -> None:
    w.store.insert()
    w.executor.fail_launch[K11] = Launched(K11, None, error="creating Job: 503")


def _abandoned(committed: bool) -> Callable[[World], None]:
    def arrange(w: World) -> None:
        w.processing(claimed_by="dead", runner_name="runner-1-1", committed=committed,
                     started_ago=7200)  # fmt: skip
        w.processing(claimed_by="dead", runner_name="runner-2-1", started_ago=60)

    return arrange


LOCAL = {"owner": "ctl", "abandoned_after": 3600.0}
ABANDONED = "abandoned: claimed by controller 'dead'"

CASES = [
    Case("claim under the cap and launch", _three_pending,
         [("claim", "ctl", [1, 2]), ("set_runner_name", K11, "runner-1-1", True),
          ("set_runner_name", K21, "runner-2-1", True)],
         [("launch", [K11, K21])]),
    Case("claim in batches until the cap", _three_pending,
         [("claim", "ctl", [1]), ("set_runner_name", K11, "runner-1-1", True),
          ("claim", "ctl", [2]), ("set_runner_name", K21, "runner-2-1", True), NO_CLAIM],
         [("launch", [K11]), ("launch", [K21])], settings={"CLAIM_BATCH_SIZE": 1}),
    Case("nothing pending", lambda w: None, [NO_CLAIM], []),
    Case("a running runner: wait", _running, [NO_CLAIM], []),
    Case("adopt a runner created before a crash", _unrecorded,
         [("set_runner_name", K11, "runner-1-1", True), NO_CLAIM], []),
    Case("crash between claim and launch: launch", lambda w: w.processing(),
         [("set_runner_name", K11, "runner-1-1", True), NO_CLAIM], [("launch", [K11])]),
    Case("success over the runner's commit", _finished(True, Phase.SUCCEEDED, exit_code=0),
         [("record_success", K11, True), NO_CLAIM], [("forget", K11)]),
    Case("committed, then failed: still success", _finished(True, Phase.FAILED, exit_code=1),
         [("record_success", K11, True), NO_CLAIM], [("forget", K11)]),
    Case("committed, still running: wait", _finished(True, Phase.RUNNING), [NO_CLAIM], []),
    Case("exit 0 without the commit: retry", _finished(False, Phase.SUCCEEDED, exit_code=0),
         [retry(K11, R.RUNNER_TEMPORARY, "the runner exited 0 but did not commit its result "
                "(result_attempt is not 1)"), NO_CLAIM],
         [("forget", K11)]),
    Case("permanent failure", _finished(False, Phase.FAILED, exit_code=10, message="bad media"),
         [("record_failure", K11, R.RUNNER_PERMANENT, "bad media", True), NO_CLAIM],
         [("forget", K11)]),
    Case("temporary failure: retry",
         _finished(False, Phase.FAILED, exit_code=11, message="WebDAV 503"),
         [retry(K11, R.RUNNER_TEMPORARY, "WebDAV 503"), NO_CLAIM], [("forget", K11)]),
    Case("the last attempt fails for good", _last_attempt,
         [("record_failure", K13, R.RUNNER_TEMPORARY,
           "WebDAV 503 (attempt 3 of 3; no attempts left)", True), NO_CLAIM],
         [("forget", K13)]),
    Case("OOM: retry with more memory",
         _finished(False, Phase.FAILED, exit_code=137, reason="OOMKilled", memory_limit="2Gi"),
         [retry(K11, R.OOM_KILLED, "OOM-killed (memory limit 2Gi)", "4Gi"), NO_CLAIM],
         [("forget", K11)]),
    Case("stuck Pending: retry and delete the runner", _stuck,
         [retry(K11, R.UNSCHEDULABLE, "unschedulable for 301 s: 0/1 nodes"), NO_CLAIM],
         [("delete", K11)]),
    Case("Verify: deleted externally", _recorded_not_seen(None),
         [retry(K11, R.DELETED, "runner runner-1-1 was deleted externally before it "
                "finished"), NO_CLAIM],
         [("verify_gone", K11), ("forget", K11)]),
    Case("Verify: not visible yet", _recorded_not_seen(Observation(Phase.NONE)),
         [NO_CLAIM], [("verify_gone", K11)]),
    Case("Verify: the API still has it", _recorded_not_seen(
         Observation(Phase.RUNNING, runner_name="runner-1-1")),
         [NO_CLAIM], [("verify_gone", K11)]),
    Case("sweep: the runner of a cancelled row is stopped", _cancelled,
         [NO_CLAIM], [("delete", K11)]),
    Case("sweep: a retried row's stale runner is stopped", _retried,
         [NO_CLAIM], [("delete", K11)]),
    Case("sweep: a row claimed after the pass read its rows is left alone",
         _claimed_elsewhere, [NO_CLAIM], [], executor={"owner": "ctl"}),
    Case("sweep: a finished runner of a recorded row is forgotten", _finished_and_recorded,
         [NO_CLAIM], [("forget", K11)]),
    Case("sweep: a finished runner of an owned row is kept", _finished_still_owned,
         [NO_CLAIM], []),
    Case("sweep: a finished runner of a row claimed after the pass read its rows is kept",
         _finished_claimed_elsewhere, [NO_CLAIM], [], executor={"owner": "ctl"}),
    Case("a launch error is remembered, nothing written", _launch_fails,
         [("claim", "ctl", [1])], [("launch", [K11])]),
    Case("abandoned by a vanished local controller: retry", _abandoned(False),
         [retry(K11, R.CONTROLLER_RESTARTED, ABANDONED), NO_CLAIM], [("forget", K11)],
         executor=LOCAL),
    Case("abandoned after its commit: success", _abandoned(True),
         [("record_success", K11, True), NO_CLAIM], [("forget", K11)], executor=LOCAL),
    Case("abandoned rows are none of a Kubernetes leader's business", _abandoned(False),
         [NO_CLAIM], [("verify_gone", K11), ("verify_gone", K21)],
         executor={"gone": {K11: Observation(Phase.NONE), K21: Observation(Phase.NONE)}}),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_pass(case: Case) -> None:
    w = world(executor_args=case.executor, **case.settings)
    case.arrange(w)
    assert w.one_pass() == (list(case.writes), list(case.calls))


def test_a_standby_writes_and_calls_nothing() -> None:
    w = world(leading=False)
    w.store.insert()
    w.processing()
    assert w.one_pass() == ([], [])
    assert sample(w, "dharma_leader") == 0


def test_leadership_lost_between_claims_stops_claiming() -> None:
    w = world(leading=Leader(True, answers=2), CLAIM_BATCH_SIZE=1)
    for _ in range(3):
        w.store.insert()
    assert w.one_pass() == (
        [("claim", "ctl", [1]), ("set_runner_name", K11, "runner-1-1", True)],
        [("launch", [K11])],
    )


def test_an_attempt_without_a_start_time_lasted_zero_seconds() -> None:
    w = world()
    key = w.processing(runner_name="runner-1-1")
    w.store.get(key.job_id).processing_started_at = None
    w.sees(key, Phase.FAILED, exit_code=10, message="bad")
    w.one_pass()
    assert sample(w, "dharma_attempt_duration_seconds_sum", outcome="runner_error_permanent") == 0


def test_a_launch_error_is_retried_until_the_pending_timeout() -> None:
    """Pass 1 claims and fails to launch; pass 2 (10 s later) tries again; pass 3 comes
    PENDING_TIMEOUT_SECONDS after the first failure."""
    w = world()
    w.store.insert()
    w.executor.fail_launch[K11] = Launched(K11, None, error="503")
    first = w.one_pass()
    w.clock.advance(10)
    second = w.one_pass()
    w.clock.advance(290)
    third = w.one_pass()
    assert first == ([("claim", "ctl", [1])], [("launch", [K11])])
    assert second == ([NO_CLAIM], [("launch", [K11])])
    assert third == (
        [retry(K11, R.LAUNCH_FAILED, "the runner could not be created for 300 s: 503"),
         NO_CLAIM],
        [("forget", K11)],
    )  # fmt: skip
    assert w.executor.observe(K11) == Observation(Phase.NONE)  # forgotten
    assert sample(w, "dharma_runner_launches_total", result="error") == 2


@pytest.mark.parametrize(
    ("result", "write"),
    [
        (Launched(K11, None, error="422 Invalid", invalid=True),
         ("record_failure", K11, R.LAUNCH_FAILED,
          "the runner could not be created: 422 Invalid", True)),
        (Launched(K11, None, error="Job exists", foreign=True),
         retry(K11, R.LAUNCH_FAILED, "the runner could not be created: Job exists")),
    ],
    ids=["invalid: fails at once", "foreign name: retried under the next attempt"],
)  # fmt: skip
def test_a_launch_that_cannot_work_fails_on_the_next_pass(result: Launched, write: Write) -> None:
    w = world()
    w.store.insert()
    w.executor.fail_launch[K11] = result
    assert w.one_pass() == ([("claim", "ctl", [1])], [("launch", [K11])])
    assert w.one_pass() == ([write, NO_CLAIM], [("forget", K11)])


def test_a_launch_that_succeeds_later_clears_the_error() -> None:
    w = world()
    w.store.insert()
    w.executor.fail_launch[K11] = Launched(K11, None, error="503")
    w.one_pass()
    del w.executor.fail_launch[K11]
    w.clock.advance(10)
    assert w.one_pass() == (
        [("set_runner_name", K11, "runner-1-1", True), NO_CLAIM],
        [("launch", [K11])],
    )
    assert w.executor.observe(K11).phase is Phase.PENDING


class CancelOnLaunch(FakeExecutor):
    """The row is cancelled while its runner is being created."""

    store: InMemoryStore | None = None

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        assert self.store is not None
        for spec in specs:
            self.store.set_status(spec.job_id, JobStatus.CANCELLED)
        return super().launch(specs)


def test_a_row_that_moved_on_during_launch_has_its_runner_stopped() -> None:
    w = world(CancelOnLaunch)
    assert isinstance(w.executor, CancelOnLaunch)
    w.executor.store = w.store
    w.store.insert()
    assert w.one_pass() == (
        [("claim", "ctl", [1]), ("set_runner_name", K11, "runner-1-1", False)],
        [("launch", [K11]), ("delete", K11)],
    )


class CancelOnObserve(FakeExecutor):
    """The row moves on between the pass's read and its write."""

    store: InMemoryStore | None = None

    def observe(self, key: RunnerKey) -> Observation:
        assert self.store is not None
        self.store.set_status(key.job_id, JobStatus.CANCELLED)
        return super().observe(key)


@pytest.mark.parametrize(
    ("committed", "phase", "details", "write"),
    [
        (True, Phase.SUCCEEDED, {"exit_code": 0}, ("record_success", K11, False)),
        (False, Phase.FAILED, {"exit_code": 10, "message": "bad"},
         ("record_failure", K11, R.RUNNER_PERMANENT, "bad", False)),
        (False, Phase.FAILED, {"exit_code": 11, "message": "503"},
         ("record_retry", K11, R.RUNNER_TEMPORARY,
          "503 (attempt 1 of 3; retrying in 5 s)", 5.0, None, False)),
    ],
    ids=["success", "failure", "retry"],
)  # fmt: skip
def test_an_outcome_of_a_row_that_moved_on_is_not_recorded(
    committed: bool, phase: Phase, details: dict[str, Any], write: Write
) -> None:
    w = world(CancelOnObserve)
    assert isinstance(w.executor, CancelOnObserve)
    w.executor.store = w.store
    w.sees(w.processing(runner_name="runner-1-1", committed=committed), phase, **details)
    assert w.one_pass() == ([write, NO_CLAIM], [("forget", K11)])
    assert sample(w, "dharma_attempt_outcomes_total", outcome="success") is None


def test_the_queue_gauges_are_read_at_most_every_interval() -> None:
    w = world(QUEUE_METRICS_INTERVAL_SECONDS=15)
    w.store.insert(due_in=60)
    w.processing()
    w.service.run_pass()
    depth = [sample(w, "dharma_queue_jobs", status=s.value) for s in JobStatus]
    assert depth == [1, 1, 0, 0, 0]
    w.store.insert()
    w.clock.advance(5)
    w.service.run_pass()
    assert sample(w, "dharma_queue_jobs", status="pending") == 1  # not re-read yet
    w.clock.advance(10)
    w.service.run_pass()
    assert sample(w, "dharma_queue_jobs", status="processing") == 2


def test_next_due_and_idle() -> None:
    w = world(exit_when_idle=True)
    assert w.service.run_pass() == (True, None)
    w.store.insert(due_in=30)
    assert w.service.run_pass() == (False, 30.0)  # a retry waiting for its backoff counts
    w.clock.advance(30)
    assert w.service.run_pass() == (False, None)  # claimed and launched: in flight
    w.executor.runners[K11] = Observation(Phase.FAILED, runner_name="runner-1-1",
                                          exit_code=10, message="bad")  # fmt: skip
    w.executor.finished.append(K11)
    assert w.service.run_pass() == (True, None)  # recorded and released: drained
    assert w.store.get(1).status is JobStatus.FAILED
    assert w.executor.calls[-1] == ("forget", K11)


def test_at_the_cap_a_due_row_waits_for_a_wake_up_not_a_timer() -> None:
    """Due rows the claim leaves behind mean the cap is full; a runner's end wakes the loop.
    Before, the pass answered "due now" and the loop came back every 50 ms while at cap."""
    w = world(exit_when_idle=True)  # MAX_CONCURRENT_JOBS=2
    for _ in range(3):
        w.store.insert()
    assert w.service.run_pass() == (False, None)
    assert [r.status for r in map(w.store.get, (1, 2, 3))] == [
        JobStatus.PROCESSING, JobStatus.PROCESSING, JobStatus.PENDING
    ]  # fmt: skip


def test_passes_come_in_a_burst_then_one_per_interval() -> None:
    now = [100.0]
    budget = pass_budget(0.5, clock=lambda: now[0])
    assert budget is not None
    assert [budget.take() for _ in range(PASS_BURST + 1)] == [True] * PASS_BURST + [False]
    assert budget.delay() == pytest.approx(0.5)
    now[0] += 0.5
    assert budget.take() and not budget.take()
    now[0] += 60  # a quiet spell: the burst is back, no more
    assert sum(budget.take() for _ in range(PASS_BURST + 5)) == PASS_BURST
    assert pass_budget(0.0) is None  # a pass per wake-up


def test_a_stream_of_wake_ups_shares_passes() -> None:
    """Under a steady stream of wake-ups (a NOTIFY per row, a dozen watch events per Job),
    passes come one per MIN_PASS_INTERVAL_SECONDS once the burst is spent, not one per
    wake-up."""
    w = world(MIN_PASS_INTERVAL_SECONDS=0.3, POLL_INTERVAL_SECONDS=60)
    passes: list[float] = []
    real_pass = w.service.run_pass

    def counted_pass() -> tuple[bool, float | None]:
        passes.append(time.monotonic())
        return real_pass()

    w.service.run_pass = counted_pass  # type: ignore[method-assign]
    thread = threading.Thread(target=w.service.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not passes:  # the first pass runs at once
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(120):  # a wake-up every 10 ms for 1.2 s
            w.service.wake()
            time.sleep(0.01)
        time.sleep(0.5)
    finally:
        w.service.request_stop()
        thread.join(timeout=10)
    # The first pass and the burst at once, then at most one per 0.3 s (1.7 s in all).
    assert PASS_BURST < len(passes) <= 1 + PASS_BURST + 6, passes


def test_shutdown_records_the_runners_the_executor_stopped() -> None:
    w = world(executor_args={"owner": "ctl", "stopped_on_shutdown": [K11]})
    w.sees(w.processing(runner_name="runner-1-1"), Phase.RUNNING)
    w.processing(runner_name="runner-2-1")  # not stopped by the executor: left alone
    w.service._shutdown()
    assert w.store.writes == [
        retry(K11, R.RUNNER_TEMPORARY, "the runner exited with code 143 without a message")
    ]
    assert w.executor.calls == [("shutdown",), ("forget", K11)]
    assert w.listener.stopped and w.store.closed


def test_shutdown_without_the_database_records_nothing() -> None:
    w = world(executor_args={"stopped_on_shutdown": [K11]})
    w.processing(runner_name="runner-1-1")
    w.store.unavailable = 1
    w.service._shutdown()
    assert w.store.writes == [] and w.store.closed


def test_shutdown_of_an_executor_that_stops_nothing_reads_nothing() -> None:
    w = world()
    w.processing()
    w.store.unavailable = 1  # would raise if read
    w.service._shutdown()
    assert w.executor.calls == [("shutdown",)] and w.store.unavailable == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_run_binds_serves_until_idle_and_shuts_down() -> None:
    """The whole loop in-process: probes served, the installation id read (once the
    database answers), the executor bound and started, leadership started, a lost database
    and a bug retried, a wake-up at the next due time, and an idle queue ends it."""
    leader = Leader(True)
    w = world(leading=leader, exit_when_idle=True, METRICS_PORT=free_port())
    w.store.unavailable = 1  # installation id: retried after 0.5 s
    lost = {"passes": 0}
    real_pass = w.service.run_pass

    def flaky_pass() -> tuple[bool, float | None]:
        lost["passes"] += 1
        if lost["passes"] == 1:
            w.store.unavailable = 1  # the first pass loses the database
        elif lost["passes"] == 2:
            raise RuntimeError("a bug")  # logged, retried
        elif lost["passes"] == 3:
            w.service.wake()
            assert w.service.probe_port is not None
            return False, 0.0  # something due now: the loop comes back at once
        return real_pass()

    w.service.run_pass = flaky_pass  # type: ignore[method-assign]
    assert w.service.run() == 0
    instance = Instance(w.service.settings.INSTANCE_NAME, w.store.installation)
    assert w.executor.calls == [("bind", instance), ("start",), ("shutdown",)]
    assert w.listener.started and w.listener.stopped and w.store.closed
    assert lost["passes"] == 4
    assert leader.started and leader.stopped
    assert sample(w, "dharma_database_errors_total") == 1


def test_run_waits_for_the_executor_to_sync_and_stops_on_request() -> None:
    w = world()
    w.executor.is_synced = False
    thread = threading.Thread(target=w.service.run)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while "has not synced" not in (w.service.health.not_ready or ""):
            assert time.monotonic() < deadline, w.service.health.not_ready
            time.sleep(0.05)
    finally:
        w.service.request_stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert w.store.writes == []
    assert w.service.probe_port is None


class StopsTheService(FakeExecutor):
    """Requests the service's stop from inside one of its calls (SIGTERM at that moment);
    subclasses choose the call."""

    service: Service | None = None

    def stop_the_service(self) -> None:
        assert self.service is not None
        self.service.request_stop()


def stopping_world(executor: type[StopsTheService], **settings: Any) -> World:
    w = world(executor, **settings)
    assert isinstance(w.executor, StopsTheService)
    w.executor.service = w.service
    return w


class StopsWhileStarting(StopsTheService):
    """While the executor starts (SIGTERM during start-up)."""

    def start(self, wake: Callable[[], None]) -> None:
        super().start(wake)
        self.stop_the_service()


def test_a_stop_requested_during_start_up_runs_no_pass() -> None:
    w = stopping_world(StopsWhileStarting)
    w.store.insert()
    assert w.service.run() == 0
    assert w.store.writes == []
    assert [c[0] for c in w.executor.calls] == ["bind", "start", "shutdown"]


def test_an_adoption_refused_because_the_row_moved_on_leaves_the_runner_to_the_sweep() -> None:
    """The row is cancelled between the pass's read and the adoption's write: the name is not
    written, nothing is recorded for the attempt, and the next pass's sweep stops the runner."""
    w = world(CancelOnObserve)
    assert isinstance(w.executor, CancelOnObserve)
    w.executor.store = w.store
    w.sees(w.processing(), Phase.RUNNING)
    assert w.one_pass() == ([("set_runner_name", K11, "runner-1-1", False), NO_CLAIM], [])
    assert w.one_pass() == ([NO_CLAIM], [("delete", K11)])


class StopDuringPass(StopsTheService):
    """While the pass reconciles (SIGTERM mid-pass)."""

    def observe(self, key: RunnerKey) -> Observation:
        self.stop_the_service()
        return super().observe(key)


def test_a_stop_requested_during_a_pass_claims_nothing() -> None:
    w = stopping_world(StopDuringPass)
    w.sees(w.processing(runner_name="runner-1-1"), Phase.RUNNING)
    w.store.insert()
    assert w.one_pass() == ([], [])


class StopsANeverLaunchedRow(FakeExecutor):
    """Reports at shutdown a runner it never saw (defensive: a real executor reports only
    children it stopped)."""

    def shutdown(self) -> list[RunnerKey]:
        self.calls.append(("shutdown",))
        return [K11]


def test_shutdown_never_launches_a_row_that_has_no_runner() -> None:
    """Reconciling at shutdown a row whose runner was never created decides Launch; the
    controller is stopping, so the row is left for the next controller to launch."""
    w = world(StopsANeverLaunchedRow, executor_args={"owner": "ctl"})
    w.processing()
    w.service._shutdown()
    assert w.store.writes == []
    assert w.executor.calls == [("shutdown",)]


class StopDuringLaunch(StopsTheService):
    """While a batch launches (SIGTERM mid-claim)."""

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        self.stop_the_service()
        return super().launch(specs)


def test_a_stop_requested_during_the_claims_ends_them() -> None:
    w = stopping_world(StopDuringLaunch, CLAIM_BATCH_SIZE=1)
    for _ in range(2):
        w.store.insert()
    assert w.one_pass() == (
        [("claim", "ctl", [1]), ("set_runner_name", K11, "runner-1-1", True)],
        [("launch", [K11])],
    )


def test_stop_before_the_database_answers() -> None:
    w = world()
    w.store.unavailable = 10**6
    w.service.request_stop()
    assert w.service.run() == 0
    assert w.executor.calls == [("shutdown",)]


class Crashed(Exception):
    """What the test's fault hooks raise where the real ones SIGKILL the controller."""


def crash() -> None:
    raise Crashed


def test_fault_hooks_are_absent_unless_a_variable_is_exactly_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert FaultHooks.from_environment({}) is None
    assert FaultHooks.from_environment({Fault.CRASH_AFTER_CLAIM.value: "true"}) is None
    hooks = FaultHooks.from_environment({Fault.CRASH_AFTER_CLAIM.value: "1"})
    assert hooks is not None and hooks.enabled == {Fault.CRASH_AFTER_CLAIM}
    warned = [r for r in caplog.records if getattr(r, "action", None) == "fault_injection_enabled"]
    assert [getattr(r, "fault", None) for r in warned] == [Fault.CRASH_AFTER_CLAIM.value]


def test_crash_after_claim_comes_after_the_claim_and_before_any_launch() -> None:
    w = world(faults=FaultHooks([Fault.CRASH_AFTER_CLAIM], kill=crash))
    w.store.insert()
    with pytest.raises(Crashed):
        w.one_pass()
    assert [write[0] for write in w.store.writes] == ["claim"]
    assert not [call for call in w.executor.calls if call[0] == "launch"]


@pytest.mark.parametrize("phase", [Phase.SUCCEEDED, Phase.FAILED])
def test_crash_before_record_comes_before_the_outcome_is_written(phase: Phase) -> None:
    w = world(faults=FaultHooks([Fault.CRASH_BEFORE_RECORD], kill=crash))
    w.sees(w.processing(runner_name="runner-1-1", committed=phase is Phase.SUCCEEDED), phase)
    with pytest.raises(Crashed):
        w.one_pass()
    assert w.store.writes == []


def test_disabled_fault_hooks_change_nothing() -> None:
    w = world(faults=FaultHooks([Fault.CRASH_AFTER_SPAWN], kill=crash))
    w.store.insert()
    writes, calls = w.one_pass()
    assert [write[0] for write in writes][:1] == ["claim"]
    assert [call[0] for call in calls if call[0] == "launch"] == ["launch"]


def test_probes_report_a_dead_listener_and_executor_thread() -> None:
    w = world()
    assert w.service.health.problem() is None
    w.listener.failure = "listen thread died"
    assert w.service.health.problem() == "listen thread died"
    w.listener.failure = None
    w.executor.failures.append("jobs watch died")
    assert w.service.health.problem() == "jobs watch died"


def test_the_local_executor_reports_abandoned_rows_after_deadline_and_grace() -> None:
    settings = ControllerSettings(**{**BASE, "JOB_DEADLINE_SECONDS": 600,
                                      "LOCAL_TERMINATION_GRACE_SECONDS": 10})  # fmt: skip
    local = LocalExecutor(settings)
    assert (local.owner, local.abandoned_after) == ("ctl", 670)
    w = world()
    row = w.store.get(w.processing(claimed_by="dead", runner_name="runner-1-1").job_id)
    seen = local.observe_abandoned(row.job_row())
    assert (seen.phase, seen.reason, seen.runner_name) == (
        Phase.FAILED, "ControllerRestarted", "runner-1-1",
    )  # fmt: skip
    assert seen.message == (
        "abandoned: claimed by controller 'dead', which did not finish it within "
        "JOB_DEADLINE_SECONDS (600 s)"
    )


# ------------------------------------------------------------------ Events ---

E = EventReason
CLAIMED = "claimed: attempt 1 of 3, memory limit 2Gi"
EVENT_CASES = [
    ("claim and launch", _three_pending,
     [(K11, E.CLAIMED, CLAIMED), (K21, E.CLAIMED, CLAIMED)]),
    ("crash between claim and launch: launched now", lambda w: w.processing(),
     [(K11, E.CLAIMED, CLAIMED)]),
    ("a launch error: nothing yet", _launch_fails, []),
    ("success", _finished(True, Phase.SUCCEEDED, exit_code=0),
     [(K11, E.SUCCEEDED, "attempt 1 of 3 succeeded")]),
    ("retry", _finished(False, Phase.FAILED, exit_code=11, message="WebDAV 503"),
     [(K11, E.RETRYING,
       "runner_error_temporary: WebDAV 503 (attempt 1 of 3; retrying in 5 s)")]),
    ("OOM: retry with more memory",
     _finished(False, Phase.FAILED, exit_code=137, reason="OOMKilled", memory_limit="2Gi"),
     [(K11, E.RETRYING, "oom_killed: OOM-killed (memory limit 2Gi) (attempt 1 of 3; "
       "retrying in 5 s; next attempt with memory limit 4Gi)")]),
    ("permanent failure", _finished(False, Phase.FAILED, exit_code=10, message="bad media"),
     [(K11, E.FAILED, "runner_error_permanent: bad media")]),
    ("the last attempt fails for good", _last_attempt,
     [(K13, E.FAILED, "runner_error_temporary: WebDAV 503 (attempt 3 of 3; no attempts left)")]),
    ("stuck Pending", _stuck,
     [(K11, E.RETRYING, "unschedulable: unschedulable for 301 s: 0/1 nodes (attempt 1 of 3; "
       "retrying in 5 s)")]),
    ("cancelled", _cancelled,
     [(K11, E.CANCELLED, "the job was cancelled; stopping its runner")]),
    ("a retried row's stale runner: stopped without an Event", _retried, []),
    ("a running runner: nothing", _running, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("arrange", "events"), [c[1:] for c in EVENT_CASES], ids=[c[0] for c in EVENT_CASES]
)
def test_the_events_a_pass_records(
    arrange: Callable[[World], object], events: list[tuple[RunnerKey, EventReason, str]]
) -> None:
    """Each decision about an attempt is told on its runner (Kubernetes: an Event on its
    Job), beside the store writes and executor calls the tables above list."""
    w = world()
    arrange(w)
    w.one_pass()
    assert w.executor.events == events


def test_an_outcome_not_recorded_is_not_told() -> None:
    """The row moved on between the pass's read and its write: no Event claims an outcome."""
    w = world(CancelOnObserve)
    assert isinstance(w.executor, CancelOnObserve)
    w.executor.store = w.store
    w.sees(w.processing(runner_name="runner-1-1"), Phase.FAILED, exit_code=10, message="bad")
    w.one_pass()
    assert w.executor.events == []


def test_a_launch_that_fails_for_good_is_told_on_its_runners_name() -> None:
    """No Job was ever created; the failure is still told for the attempt (the Kubernetes
    executor regards the name its Job would have had)."""
    w = world()
    w.store.insert()
    w.executor.fail_launch[K11] = Launched(K11, None, error="422 Invalid", invalid=True)
    w.one_pass()
    w.one_pass()
    assert w.executor.events == [
        (K11, E.FAILED, "launch_failed: the runner could not be created: 422 Invalid")
    ]


def test_a_row_with_its_own_memory_limit_is_told_with_it() -> None:
    w = world()
    w.store.insert(memory_limit="6Gi")
    w.one_pass()
    assert w.executor.events == [(K11, E.CLAIMED, "claimed: attempt 1 of 3, memory limit 6Gi")]


def test_a_job_naming_an_unknown_model_fails_at_once_without_a_runner() -> None:
    """Issue 12 item 3: the executor refuses to build a runner for a model the catalog lacks
    (an invalid launch: test_controller_kube.py, test_controller_local.py); the loop wakes
    itself and the next pass fails the row permanently, naming the model and the known ones."""
    w = world()
    job_id = w.store.insert(model="large")
    message = "model 'large' is not in the model catalog (WHISPER_MODELS); known models: base"
    w.executor.fail_launch[K11] = Launched(K11, None, error=message, invalid=True)
    assert w.one_pass() == ([("claim", "ctl", [job_id])], [("launch", [K11])])
    assert w.service._wake.is_set()  # not left to the next poll
    assert w.one_pass() == (
        [("record_failure", K11, R.UNKNOWN_MODEL, message, True), NO_CLAIM],
        [("forget", K11)],
    )
    assert w.store.get(job_id).status is JobStatus.FAILED
    assert not w.executor.runners


def test_a_runner_is_stopped_once_while_its_stop_takes_effect() -> None:
    """A deleted Job stays in the cache until the watch's next event (read in batches: tens of
    milliseconds), and a SIGTERMed local runner lives through its grace period; passes in
    between must not stop it again: one delete, one Cancelled Event, one count (CI saw the
    Event twice on a real control plane). If the runner outlives STOP_PATIENCE_SECONDS, the
    stop is asked again."""
    w = world(executor_args={"slow_stops": True})
    _cancelled(w)
    assert w.one_pass()[1] == [("delete", K11)]
    for _ in range(3):
        w.clock.advance(1)
        assert w.one_pass()[1] == []
    assert [e[1] for e in w.executor.events] == [E.CANCELLED]
    assert sample(w, "dharma_runner_deletions_total", why="cancelled") == 1
    w.clock.advance(STOP_PATIENCE_SECONDS)
    assert w.one_pass()[1] == [("delete", K11)]


def test_a_runner_deleted_by_a_failure_is_not_swept_after() -> None:
    """Stuck Pending: the failure deletes the runner; the next pass, which sees it still (the
    watch is behind), neither deletes it again nor counts it a second time under
    row_moved_on."""
    w = world(executor_args={"slow_stops": True})
    _stuck(w)
    assert w.one_pass()[1] == [("delete", K11)]
    assert w.one_pass()[1] == []
    assert sample(w, "dharma_runner_deletions_total", why="unschedulable") == 1
    assert sample(w, "dharma_runner_deletions_total", why="row_moved_on") is None


def test_a_stop_that_could_not_be_asked_is_asked_again_next_pass() -> None:
    """The API refused the delete (not a 404): the runner is still there, so the next pass
    asks again; the Cancelled Event is told once, when the stop was asked for."""
    w = world(executor_args={"slow_stops": True, "refuse_delete": {K11}})
    _cancelled(w)
    assert w.one_pass()[1] == [("delete", K11)]
    assert w.executor.events == []
    w.executor.refuse_delete.clear()
    assert w.one_pass()[1] == [("delete", K11)]
    assert w.one_pass()[1] == []
    assert [e[1] for e in w.executor.events] == [E.CANCELLED]
