"""What to do about one claimed attempt, as a pure function of what is observed.

`decide(row, observation, now, settings)` looks at a row the controller owns (status
`processing`, this attempt's fencing token) and at its runner, and returns one action. It
does no I/O, so every combination is covered by a table test (tests/unit/test_reconcile.py)
and the service loop only carries actions out. `plan_failure` then turns a failure into a
retry (back to `pending` after a backoff) or a final `failed`.

Rules, in order:

1. No runner observed: launch it if none was recorded (failing at once if a runner of that
   name exists but its labels say it is not this attempt's); if one was recorded (`runner_name`)
   ask the executor to confirm it is really gone — then it was deleted externally, which is
   reported, never silently relaunched.
2. `result_attempt == attempts`: the runner committed its results in its final fenced
   transaction, so the attempt succeeded, whatever the pod did afterwards. This is the
   only way to success.
3. A finished runner is classified: exit 0 without the commit is a temporary failure (a Job
   left from a restored database, or not ours, proves nothing); OOM kill (retried with a larger
   memory limit up to RUNNER_MEMORY_LIMIT_MAX); deadline (not retried: the same media would
   time out again); a kubelet eviction (permanent when the pod's own usage exceeded its
   limit, temporary when the node ran short); exit 10 permanent / 11 or a crash temporary,
   with the runner's own termination message; deleted externally (retried).
4. A runner Pending longer than PENDING_TIMEOUT_SECONDS fails with the reason the cluster
   gives (image pull, unschedulable, missing Secret/ConfigMap) and is deleted.

Exit code 12 (fenced) means the runner found the row no longer its own. Such runners belong
to rows that are no longer `processing` at their attempt, so they never reach `decide` and
nothing is recorded for them. If one does reach it, the row contradicts the runner (someone
edited it by hand); it is treated as a temporary failure so the row cannot hang forever.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from controller.jobspec import LaunchSpec, UnknownModel, memory, model_entry
from controller.model import (
    CONFIG_ERROR_REASONS,
    IMAGE_PULL_REASONS,
    REASON_CONTROLLER_RESTARTED,
    REASON_DEADLINE,
    REASON_EVICTED,
    REASON_FOREIGN,
    REASON_INVALID,
    REASON_OOM,
    REASON_UNSCHEDULABLE,
    JobRow,
    Observation,
    Phase,
)
from controller.quantity import parse_bytes, scale_memory
from controller.settings import ControllerSettings
from dharma_common.contract import ErrorClass, classify_exit_code


class FailureReason(str, enum.Enum):
    """Machine-readable class of a failed attempt (`stt_jobs.failure_reason`, metrics)."""

    RUNNER_PERMANENT = "runner_error_permanent"
    RUNNER_TEMPORARY = "runner_error_temporary"
    OOM_KILLED = "oom_killed"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    IMAGE_PULL = "image_pull_error"
    UNSCHEDULABLE = "unschedulable"
    CONFIG_ERROR = "config_error"
    PENDING_TIMEOUT = "pending_timeout"
    DELETED = "deleted_externally"
    CONTROLLER_RESTARTED = "controller_restarted"
    EVICTED = "evicted"
    LAUNCH_FAILED = "launch_failed"
    UNKNOWN_MODEL = "unknown_model"


@dataclass(frozen=True)
class Launch:
    """Start the runner of this attempt (idempotent: the runner's name is deterministic)."""


@dataclass(frozen=True)
class Wait:
    """Nothing to do yet."""

    why: str


@dataclass(frozen=True)
class Verify:
    """A runner was recorded but is not observed: ask the executor whether it is really gone
    (a cache can lag behind a create), then decide again with the answer."""


@dataclass(frozen=True)
class Succeed:
    """Record success."""


@dataclass(frozen=True)
class Failure:
    """The attempt failed; `plan_failure` decides between retry and final failure."""

    reason: FailureReason
    message: str
    retryable: bool
    #: Memory limit for the next attempt (OOM kills only).
    memory_limit: str | None = None
    #: The runner is still there (stuck Pending) and must be removed.
    delete_runner: bool = False


Action = Launch | Wait | Verify | Succeed | Failure


def decide(
    row: JobRow, seen: Observation, now: dt.datetime, settings: ControllerSettings
) -> Action:
    """The next action for an owned row (`processing` at `row.attempts`)."""
    if seen.phase is Phase.NONE:
        if row.runner_name:
            return Verify()
        return _not_launched(row, seen, now, settings)
    committed = row.result_attempt is not None and row.result_attempt == row.attempts
    if seen.phase in (Phase.PENDING, Phase.RUNNING):
        if committed:
            return Wait("results committed; waiting for the runner to exit")
        if seen.phase is Phase.PENDING:
            return _pending(row, seen, now, settings)
        return Wait("running")
    if committed:
        return Succeed()
    if seen.phase is Phase.SUCCEEDED:
        # Exit 0 alone proves nothing: a Job left from before a database restore, or not
        # ours, completes without this attempt's results. Only the commit counts.
        return Failure(
            FailureReason.RUNNER_TEMPORARY,
            f"the runner exited 0 but did not commit its result "
            f"(result_attempt is not {row.attempts})",
            retryable=True,
        )
    if seen.phase is Phase.DELETED:
        what = f"{seen.deleted_kind or 'runner'} {seen.runner_name or row.runner_name}"
        message = f"{what} was deleted externally before it finished"
        if seen.message:
            message += f" (runner said: {seen.message})"
        return Failure(FailureReason.DELETED, message, retryable=True)
    return _failed(row, seen, settings)


def _seconds(delta: dt.timedelta) -> int:
    return max(0, int(delta.total_seconds()))


def _not_launched(
    row: JobRow, seen: Observation, now: dt.datetime, settings: ControllerSettings
) -> Action:
    """Launch, unless the job names a model the catalog lacks (no runner: permanent, the
    model and the known ones named), or launching has been failing for too long (or cannot
    ever work)."""
    try:
        model_entry(settings, row.model)
    except UnknownModel as exc:
        return Failure(FailureReason.UNKNOWN_MODEL, str(exc), retryable=False)
    if seen.reason == REASON_INVALID:
        return Failure(
            FailureReason.LAUNCH_FAILED,
            f"the runner could not be created: {seen.message or 'rejected'}",
            retryable=False,
        )
    if seen.reason == REASON_FOREIGN:
        return Failure(
            FailureReason.LAUNCH_FAILED,
            f"the runner could not be created: {seen.message or 'its name is taken'}",
            retryable=True,
        )
    if seen.since is not None and seen.message:
        waited = _seconds(now - seen.since)
        if waited >= settings.PENDING_TIMEOUT_SECONDS:
            return Failure(
                FailureReason.LAUNCH_FAILED,
                f"the runner could not be created for {waited} s: {seen.message}",
                retryable=True,
            )
    return Launch()


def _pending(
    row: JobRow, seen: Observation, now: dt.datetime, settings: ControllerSettings
) -> Action:
    since = seen.since or row.processing_started_at or now
    waited = _seconds(now - since)
    detail = seen.waiting_reason or "no reason reported"
    if waited < settings.PENDING_TIMEOUT_SECONDS:
        return Wait(f"pending for {waited} s ({detail})")
    said = f": {seen.message}" if seen.message else ""
    if seen.waiting_reason in IMAGE_PULL_REASONS:
        return Failure(
            FailureReason.IMAGE_PULL,
            f"image {seen.image or '?'} could not be pulled ({seen.waiting_reason}{said}); "
            f"pending for {waited} s",
            retryable=seen.waiting_reason != "InvalidImageName",
            delete_runner=True,
        )
    if seen.waiting_reason == REASON_UNSCHEDULABLE:
        return Failure(
            FailureReason.UNSCHEDULABLE,
            f"unschedulable for {waited} s{said}",
            retryable=True,
            delete_runner=True,
        )
    if seen.waiting_reason in CONFIG_ERROR_REASONS:
        return Failure(
            FailureReason.CONFIG_ERROR,
            f"the runner could not start: configuration error ({seen.waiting_reason}{said})",
            retryable=False,
            delete_runner=True,
        )
    return Failure(
        FailureReason.PENDING_TIMEOUT,
        f"the runner was still Pending after {waited} s ({detail}{said})",
        retryable=True,
        delete_runner=True,
    )


def _failed(row: JobRow, seen: Observation, settings: ControllerSettings) -> Action:
    if seen.reason == REASON_OOM:
        limit = seen.memory_limit or row.memory_limit or _first_limit(row, settings)
        try:
            bigger = scale_memory(
                limit, settings.RUNNER_OOM_MEMORY_FACTOR, settings.RUNNER_MEMORY_LIMIT_MAX
            )
            grows = parse_bytes(bigger) > parse_bytes(limit)
        except ValueError:
            bigger, grows = limit, False
        message = f"OOM-killed (memory limit {limit})"
        if not grows:
            message += f"; already at RUNNER_MEMORY_LIMIT_MAX ({settings.RUNNER_MEMORY_LIMIT_MAX})"
        return Failure(
            FailureReason.OOM_KILLED,
            message,
            retryable=grows,
            memory_limit=bigger if grows else None,
        )
    if seen.reason == REASON_DEADLINE:
        seconds = seen.deadline_seconds or settings.JOB_DEADLINE_SECONDS
        return Failure(
            FailureReason.DEADLINE_EXCEEDED,
            f"timed out after {seconds} s (JOB_DEADLINE_SECONDS)",
            retryable=False,
        )
    if seen.reason == REASON_EVICTED:
        return _evicted(seen.message)
    if seen.reason == REASON_CONTROLLER_RESTARTED:
        return Failure(
            FailureReason.CONTROLLER_RESTARTED,
            seen.message or "the controller restarted while this attempt was running",
            retryable=True,
        )
    code = seen.exit_code
    if code is None:
        what = ": ".join(part for part in (seen.reason, seen.message) if part)
        return Failure(
            FailureReason.RUNNER_TEMPORARY,
            f"the runner failed without an exit code ({what or 'no reason reported'})",
            retryable=True,
        )
    error_class = classify_exit_code(code)
    if error_class is ErrorClass.PERMANENT:
        return Failure(
            FailureReason.RUNNER_PERMANENT,
            seen.message or f"the runner failed permanently (exit code {code}) without a message",
            retryable=False,
        )
    if error_class is ErrorClass.FENCED:
        return Failure(
            FailureReason.RUNNER_TEMPORARY,
            f"the runner exited as fenced (exit code {code}) although the row still belongs "
            f"to attempt {row.attempts}" + (f": {seen.message}" if seen.message else ""),
            retryable=True,
        )
    if seen.message:
        return Failure(FailureReason.RUNNER_TEMPORARY, seen.message, retryable=True)
    why = f", {seen.reason}" if seen.reason and seen.reason != "Error" else ""
    return Failure(
        FailureReason.RUNNER_TEMPORARY,
        f"the runner exited with code {code}{why} without a message",
        retryable=True,
    )


#: Words of the kubelet's eviction messages for a pod over its *own* limits ("Pod ephemeral
#: local storage usage exceeds the total limit of containers 2Gi.", "Usage of EmptyDir volume
#: "scratch" exceeds the limit "20Gi".", "Container runner exceeded its local ephemeral
#: storage limit "2Gi"."). Node pressure ("The node was low on resource: ...") has neither.
_OWN_LIMIT_WORDS = ("exceeds the total limit", "exceeds the limit", "exceeded its local")


def _first_limit(row: JobRow, settings: ControllerSettings) -> str:
    """The limit the attempt was launched with when the executor did not say."""
    try:
        return memory(settings, LaunchSpec.of(row))[1]
    except UnknownModel:  # the catalog changed since the launch
        return settings.RUNNER_MEMORY_LIMIT


def _evicted(message: str | None) -> Failure:
    """An eviction for the pod's own usage would happen again with the same source and the
    same RUNNER_SCRATCH_SIZE, so it is permanent; a node short of disk is another node's (or
    a later hour's) problem, so it is retried. An unrecognised message is retried: the
    attempt limit still bounds it."""
    said = (message or "").strip()
    own = any(words in said for words in _OWN_LIMIT_WORDS)
    text = f"evicted by the kubelet: {said or 'no message'}"
    if own:
        text += (
            " (the attempt needs more scratch space than RUNNER_SCRATCH_SIZE allows; "
            "it would be evicted again)"
        )
    return Failure(FailureReason.EVICTED, text, retryable=not own)


# ------------------------------------------------------------------ retry planning ---


@dataclass(frozen=True)
class Retry:
    """Back to `pending`, claimable again after `delay_seconds`."""

    reason: FailureReason
    message: str
    delay_seconds: float
    memory_limit: str | None


@dataclass(frozen=True)
class GiveUp:
    """Final `failed`."""

    reason: FailureReason
    message: str


def backoff_seconds(attempt: int, base: float, cap: float, jitter: float) -> float:
    """Exponential backoff with "equal jitter": half of base*2^(attempt-1) (capped) is fixed,
    the other half is scaled by `jitter` in [0, 1), so retries of a burst of failures spread
    out instead of stampeding back together."""
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + ceiling / 2 * min(max(jitter, 0.0), 1.0)


def plan_failure(
    row: JobRow, failure: Failure, settings: ControllerSettings, jitter: float
) -> Retry | GiveUp:
    """Retry a retryable failure while attempts remain; otherwise fail the job.

    Counted from the row's last re-queue (`attempt_number`), not from `attempts`: the fencing
    token keeps growing across re-queues, the budget and the backoff start afresh."""
    number = row.attempt_number
    tally = f"attempt {number} of {row.max_attempts}"
    if failure.retryable and number < row.max_attempts:
        delay = backoff_seconds(
            number, settings.RETRY_BASE_SECONDS, settings.RETRY_MAX_SECONDS, jitter
        )
        more = f"; next attempt with memory limit {failure.memory_limit}" * bool(
            failure.memory_limit
        )
        return Retry(
            failure.reason,
            f"{failure.message} ({tally}; retrying in {delay:.0f} s{more})",
            delay,
            failure.memory_limit,
        )
    if failure.retryable:
        return GiveUp(failure.reason, f"{failure.message} ({tally}; no attempts left)")
    return GiveUp(failure.reason, failure.message)
