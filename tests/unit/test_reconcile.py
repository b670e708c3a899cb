"""The reconcile rules as a table: (row, observation) -> action, with no I/O at all."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from controller.model import JobRow, Observation, Phase
from controller.reconcile import (
    Failure,
    FailureReason,
    GiveUp,
    Launch,
    Retry,
    Succeed,
    Verify,
    Wait,
    backoff_seconds,
    decide,
    plan_failure,
)
from controller.settings import ControllerSettings
from dharma_common.models import ModelEntry

NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
SETTINGS = ControllerSettings(
    DB_HOST="db", DB_USER="u", PENDING_TIMEOUT_SECONDS=600, JOB_DEADLINE_SECONDS=3600,
    RUNNER_MEMORY_LIMIT="2Gi", RUNNER_MEMORY_LIMIT_MAX="8Gi", RUNNER_OOM_MEMORY_FACTOR=2.0,
    RETRY_BASE_SECONDS=30, RETRY_MAX_SECONDS=3600,
    WHISPER_MODELS={"base": ModelEntry(file="ggml-base.bin", sha256="a" * 64),
                    "small": ModelEntry(file="volume/ggml-small.bin", sha256="b" * 64,
                                        memory="3Gi")},
)  # fmt: skip
UNKNOWN_LARGE = ("model 'large' is not in the model catalog (WHISPER_MODELS); known models: "
                 "base, small")  # fmt: skip


def row(**changes: Any) -> JobRow:
    base: dict[str, Any] = {
        "id": 7, "media_id": uuid.UUID(int=1), "status": "processing", "attempts": 1,
        "max_attempts": 3, "runner_name": "dharma-stt-7-1", "result_attempt": None,
        "memory_limit": None, "processing_started_at": NOW - dt.timedelta(minutes=5),
    }  # fmt: skip
    base.update(changes)
    return JobRow(**base)


def seen(phase: Phase, **fields: Any) -> Observation:
    return Observation(phase, runner_name="dharma-stt-7-1", **fields)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


CASES: list[tuple[str, JobRow, Observation, Any]] = [
    ("claimed, never launched", row(runner_name=None), Observation(Phase.NONE), Launch()),
    ("recorded runner not seen: verify", row(), Observation(Phase.NONE), Verify()),
    ("running", row(), seen(Phase.RUNNING, since=ago(10)), Wait("running")),
    ("pending, within timeout", row(), seen(Phase.PENDING, since=ago(599),
     waiting_reason="ErrImagePull"), Wait("pending for 599 s (ErrImagePull)")),
    ("succeeded and committed", row(result_attempt=1), seen(Phase.SUCCEEDED, exit_code=0),
     Succeed()),
    # A Job that completed without this attempt's commit (a Job left over from a restored
    # database, or not ours) proves nothing: success needs the runner's committed result.
    ("succeeded without a commit", row(), seen(Phase.SUCCEEDED, exit_code=0),
     Failure(FailureReason.RUNNER_TEMPORARY, "the runner exited 0 but did not commit its "
             "result (result_attempt is not 1)", retryable=True)),
    ("succeeded, an older attempt committed", row(attempts=2, result_attempt=1),
     seen(Phase.SUCCEEDED, exit_code=0),
     Failure(FailureReason.RUNNER_TEMPORARY, "the runner exited 0 but did not commit its "
             "result (result_attempt is not 2)", retryable=True)),
    ("existing Job is not this attempt's", row(runner_name=None),
     Observation(Phase.NONE, since=ago(1), reason="Foreign",
                 message="Job dharma-stt-7-1 already exists but is not this attempt's "
                 "(dharma.stream/attempt=3)"),
     Failure(FailureReason.LAUNCH_FAILED, "the runner could not be created: Job dharma-stt-7-1 "
             "already exists but is not this attempt's (dharma.stream/attempt=3)",
             retryable=True)),
    ("committed, then pod failed oddly", row(result_attempt=1),
     seen(Phase.FAILED, exit_code=137, reason="Error"), Succeed()),
    ("committed, then pod deleted", row(result_attempt=1), seen(Phase.DELETED), Succeed()),
    ("committed, still running", row(result_attempt=1), seen(Phase.RUNNING),
     Wait("results committed; waiting for the runner to exit")),
    ("older attempt committed does not count", row(attempts=2, result_attempt=1),
     seen(Phase.FAILED, exit_code=11, message="WebDAV 503"),
     Failure(FailureReason.RUNNER_TEMPORARY, "WebDAV 503", retryable=True)),
    ("permanent runner error", row(), seen(Phase.FAILED, exit_code=10, reason="Error",
     message="source is not readable media"),
     Failure(FailureReason.RUNNER_PERMANENT, "source is not readable media", retryable=False)),
    ("permanent without message", row(), seen(Phase.FAILED, exit_code=10),
     Failure(FailureReason.RUNNER_PERMANENT,
             "the runner failed permanently (exit code 10) without a message", retryable=False)),
    ("temporary runner error", row(), seen(Phase.FAILED, exit_code=11, message="db restarted"),
     Failure(FailureReason.RUNNER_TEMPORARY, "db restarted", retryable=True)),
    ("crash without message", row(), seen(Phase.FAILED, exit_code=139, reason="Error"),
     Failure(FailureReason.RUNNER_TEMPORARY, "the runner exited with code 139 without a message",
             retryable=True)),
    ("killed by a signal", row(), seen(Phase.FAILED, exit_code=137, reason="killed by SIGKILL"),
     Failure(FailureReason.RUNNER_TEMPORARY,
             "the runner exited with code 137, killed by SIGKILL without a message",
             retryable=True)),
    ("fenced but row still owned", row(), seen(Phase.FAILED, exit_code=12, message="not mine"),
     Failure(FailureReason.RUNNER_TEMPORARY, "the runner exited as fenced (exit code 12) "
             "although the row still belongs to attempt 1: not mine", retryable=True)),
    ("failed without exit code", row(), seen(Phase.FAILED, reason="BackoffLimitExceeded"),
     Failure(FailureReason.RUNNER_TEMPORARY,
             "the runner failed without an exit code (BackoffLimitExceeded)", retryable=True)),
    ("OOM: retried with double memory", row(), seen(Phase.FAILED, exit_code=137,
     reason="OOMKilled", memory_limit="2Gi"),
     Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 2Gi)", retryable=True,
             memory_limit="4Gi")),
    ("OOM: capped at the maximum", row(memory_limit="6Gi"), seen(Phase.FAILED,
     reason="OOMKilled", memory_limit="6Gi"),
     Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 6Gi)", retryable=True,
             memory_limit="8Gi")),
    ("OOM: already at the maximum", row(memory_limit="8Gi"), seen(Phase.FAILED,
     reason="OOMKilled", memory_limit="8Gi"),
     Failure(FailureReason.OOM_KILLED,
             "OOM-killed (memory limit 8Gi); already at RUNNER_MEMORY_LIMIT_MAX (8Gi)",
             retryable=False)),
    ("OOM without a known limit uses the row's", row(memory_limit="3Gi"),
     seen(Phase.FAILED, reason="OOMKilled"),
     Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 3Gi)", retryable=True,
             memory_limit="6Gi")),
    ("deadline", row(), seen(Phase.FAILED, reason="DeadlineExceeded", deadline_seconds=900),
     Failure(FailureReason.DEADLINE_EXCEEDED, "timed out after 900 s (JOB_DEADLINE_SECONDS)",
             retryable=False)),
    ("deadline, limit from settings", row(), seen(Phase.FAILED, reason="DeadlineExceeded"),
     Failure(FailureReason.DEADLINE_EXCEEDED, "timed out after 3600 s (JOB_DEADLINE_SECONDS)",
             retryable=False)),
    ("Job deleted externally", row(), seen(Phase.DELETED, deleted_kind="Job"),
     Failure(FailureReason.DELETED,
             "Job dharma-stt-7-1 was deleted externally before it finished", retryable=True)),
    ("pod deleted externally", row(), seen(Phase.DELETED, deleted_kind="pod of Job",
     message="terminated by SIGTERM"),
     Failure(FailureReason.DELETED, "pod of Job dharma-stt-7-1 was deleted externally before it "
             "finished (runner said: terminated by SIGTERM)", retryable=True)),
    ("controller restarted", row(), seen(Phase.FAILED, reason="ControllerRestarted",
     message="stopped"), Failure(FailureReason.CONTROLLER_RESTARTED, "stopped", retryable=True)),
    ("image pull stuck", row(), seen(Phase.PENDING, since=ago(601), image="reg/x:1",
     waiting_reason="ImagePullBackOff", message="Back-off pulling image"),
     Failure(FailureReason.IMAGE_PULL, "image reg/x:1 could not be pulled (ImagePullBackOff: "
             "Back-off pulling image); pending for 601 s", retryable=True, delete_runner=True)),
    ("invalid image name", row(), seen(Phase.PENDING, since=ago(700), image="bad image",
     waiting_reason="InvalidImageName"),
     Failure(FailureReason.IMAGE_PULL, "image bad image could not be pulled (InvalidImageName); "
             "pending for 700 s", retryable=False, delete_runner=True)),
    ("unschedulable", row(), seen(Phase.PENDING, since=ago(900), waiting_reason="Unschedulable",
     message="0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."),
     Failure(FailureReason.UNSCHEDULABLE, "unschedulable for 900 s: 0/3 nodes are available: "
             "3 node(s) didn't match Pod's node affinity/selector.", retryable=True,
             delete_runner=True)),
    ("missing secret", row(), seen(Phase.PENDING, since=ago(600),
     waiting_reason="CreateContainerConfigError", message='secret "dharma-stream" not found'),
     Failure(FailureReason.CONFIG_ERROR, "the runner could not start: configuration error "
             '(CreateContainerConfigError: secret "dharma-stream" not found)', retryable=False,
             delete_runner=True)),
    ("pending for no known reason", row(), seen(Phase.PENDING, since=ago(601)),
     Failure(FailureReason.PENDING_TIMEOUT, "the runner was still Pending after 601 s "
             "(no reason reported)", retryable=True, delete_runner=True)),
    ("pending since the claim when the runner has no time", row(
     processing_started_at=ago(1000)), seen(Phase.PENDING, waiting_reason="NoPodYet"),
     Failure(FailureReason.PENDING_TIMEOUT, "the runner was still Pending after 1000 s "
             "(NoPodYet)", retryable=True, delete_runner=True)),
    ("launch failing, within timeout", row(runner_name=None),
     Observation(Phase.NONE, since=ago(30), message="503"), Launch()),
    ("launch failing for too long", row(runner_name=None),
     Observation(Phase.NONE, since=ago(600), message="creating Job: 403 Forbidden"),
     Failure(FailureReason.LAUNCH_FAILED, "the runner could not be created for 600 s: "
             "creating Job: 403 Forbidden", retryable=True)),
    ("evicted for its own disk usage", row(), seen(Phase.FAILED, exit_code=137, reason="Evicted",
     message="Pod ephemeral local storage usage exceeds the total limit of containers 2Gi."),
     Failure(FailureReason.EVICTED, "evicted by the kubelet: Pod ephemeral local storage usage "
             "exceeds the total limit of containers 2Gi. (the attempt needs more scratch space "
             "than RUNNER_SCRATCH_SIZE allows; it would be evicted again)", retryable=False)),
    ("evicted for its emptyDir", row(), seen(Phase.FAILED, exit_code=137, reason="Evicted",
     message='Usage of EmptyDir volume "scratch" exceeds the limit "20Gi". '),
     Failure(FailureReason.EVICTED, 'evicted by the kubelet: Usage of EmptyDir volume "scratch" '
             'exceeds the limit "20Gi". (the attempt needs more scratch space than '
             "RUNNER_SCRATCH_SIZE allows; it would be evicted again)", retryable=False)),
    ("evicted under node pressure", row(), seen(Phase.FAILED, exit_code=137, reason="Evicted",
     message="The node was low on resource: ephemeral-storage. Container runner was using "
             "3Gi, request is 20Gi, has larger consumption of ephemeral-storage. "),
     Failure(FailureReason.EVICTED, "evicted by the kubelet: The node was low on resource: "
             "ephemeral-storage. Container runner was using 3Gi, request is 20Gi, has larger "
             "consumption of ephemeral-storage.", retryable=True)),
    ("evicted without a message", row(), seen(Phase.FAILED, reason="Evicted"),
     Failure(FailureReason.EVICTED, "evicted by the kubelet: no message", retryable=True)),
    ("launch rejected as invalid", row(runner_name=None),
     Observation(Phase.NONE, since=ago(1), message="422 Invalid", reason="Invalid"),
     Failure(FailureReason.LAUNCH_FAILED, "the runner could not be created: 422 Invalid",
             retryable=False)),
    # Issue 12 item 3: a job naming a model the catalog lacks fails at once, permanently,
    # without a runner, the model and the known ones named; a known one is launched.
    ("claimed, its model unknown", row(runner_name=None, model="large"),
     Observation(Phase.NONE), Failure(FailureReason.UNKNOWN_MODEL, UNKNOWN_LARGE,
                                      retryable=False)),
    ("unknown model after the executor refused it", row(runner_name=None, model="large"),
     Observation(Phase.NONE, since=ago(1), message=UNKNOWN_LARGE, reason="Invalid"),
     Failure(FailureReason.UNKNOWN_MODEL, UNKNOWN_LARGE, retryable=False)),
    ("claimed, its model known", row(runner_name=None, model="small"),
     Observation(Phase.NONE), Launch()),
    # The first limit of a model with a memory is that memory, not RUNNER_MEMORY_LIMIT.
    ("OOM without a known limit: the model's memory", row(model="small"),
     seen(Phase.FAILED, reason="OOMKilled"),
     Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 3Gi)", retryable=True,
             memory_limit="6Gi")),
    ("OOM without a known limit: RUNNER_MEMORY_LIMIT", row(model="base"),
     seen(Phase.FAILED, reason="OOMKilled"),
     Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 2Gi)", retryable=True,
             memory_limit="4Gi")),
]  # fmt: skip


@pytest.mark.parametrize(("name", "job", "observed", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, job: JobRow, observed: Observation, expected: Any) -> None:
    assert decide(job, observed, NOW, SETTINGS) == expected


def test_every_failure_reason_is_reachable() -> None:
    reached = {c[3].reason for c in CASES if isinstance(c[3], Failure)}
    assert reached == set(FailureReason)


def test_retry_while_attempts_remain() -> None:
    failure = Failure(FailureReason.OOM_KILLED, "OOM-killed (memory limit 2Gi)", True, "4Gi")
    plan = plan_failure(row(attempts=1), failure, SETTINGS, jitter=0.0)
    assert plan == Retry(
        FailureReason.OOM_KILLED,
        "OOM-killed (memory limit 2Gi) (attempt 1 of 3; retrying in 15 s; next attempt with "
        "memory limit 4Gi)",
        15.0,
        "4Gi",
    )


def test_give_up_when_attempts_are_used_up() -> None:
    failure = Failure(FailureReason.RUNNER_TEMPORARY, "WebDAV 503", True)
    plan = plan_failure(row(attempts=3), failure, SETTINGS, jitter=0.5)
    assert plan == GiveUp(
        FailureReason.RUNNER_TEMPORARY, "WebDAV 503 (attempt 3 of 3; no attempts left)"
    )


def test_a_requeued_row_counts_its_attempts_from_the_re_queue() -> None:
    """Issue item 12: a failed row set back to pending (attempts_base = 3, the attempts it had
    used) gets max_attempts more; the tally and the backoff are relative to the re-queue."""
    failure = Failure(FailureReason.RUNNER_TEMPORARY, "WebDAV 503", True)
    assert plan_failure(row(attempts=4, attempts_base=3), failure, SETTINGS, 0.0) == Retry(
        FailureReason.RUNNER_TEMPORARY, "WebDAV 503 (attempt 1 of 3; retrying in 15 s)", 15.0, None
    )
    assert plan_failure(row(attempts=6, attempts_base=3), failure, SETTINGS, 0.0) == GiveUp(
        FailureReason.RUNNER_TEMPORARY, "WebDAV 503 (attempt 3 of 3; no attempts left)"
    )


def test_permanent_failure_is_final_at_once() -> None:
    failure = Failure(FailureReason.RUNNER_PERMANENT, "bad media", False)
    assert plan_failure(row(attempts=1), failure, SETTINGS, 0.3) == GiveUp(
        FailureReason.RUNNER_PERMANENT, "bad media"
    )


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 15.0), (1, 1.0, 30.0), (2, 0.0, 30.0), (3, 0.5, 90.0), (10, 0.0, 1800.0),
     (10, 1.0, 3600.0), (60, 0.99, 3582.0)],
)  # fmt: skip
def test_backoff_is_exponential_with_jitter_and_capped(
    attempt: int, jitter: float, expected: float
) -> None:
    assert backoff_seconds(attempt, 30, 3600, jitter) == pytest.approx(expected)


def test_backoff_jitter_spreads_retries() -> None:
    delays = {backoff_seconds(3, 30, 3600, j / 10) for j in range(10)}
    assert len(delays) == 10 and min(delays) >= 60 and max(delays) < 120
