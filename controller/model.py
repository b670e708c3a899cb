"""The plain data the controller reasons about: a job row, and what an executor observed of
the runner of one attempt.

Both executors (Kubernetes Jobs, local subprocesses) translate their world into the same
`Observation`, so the decision of what to do next (controller/reconcile.py) is written,
and tested, once.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import uuid
from dataclasses import dataclass

from dharma_common.contract import JobStatus


@dataclass(frozen=True)
class JobRow:
    """The columns of `dharma.stt_jobs` that decisions depend on."""

    id: int
    media_id: uuid.UUID
    status: JobStatus
    attempts: int
    max_attempts: int
    runner_name: str | None = None
    result_attempt: int | None = None
    memory_limit: str | None = None
    processing_started_at: dt.datetime | None = None
    claimed_by: str | None = None
    #: `attempts` when an operator last re-queued the row from a final status: the retry
    #: budget counts from here, because `attempts` itself (the fencing token) never goes back.
    attempts_base: int = 0
    #: The model the job names (a WHISPER_MODELS key, migration 0009); None: the default.
    model: str | None = None

    @functools.cached_property  # asked many times a pass, for every row in flight
    def key(self) -> RunnerKey:
        return RunnerKey(self.id, self.attempts)

    @property
    def attempt_number(self) -> int:
        """Which attempt of the current budget this is (1 .. max_attempts)."""
        return self.attempts - self.attempts_base


@dataclass(frozen=True, order=True)
class RunnerKey:
    """One attempt of one job: the fencing token, and the identity of its runner."""

    job_id: int
    attempt: int


class Phase(enum.Enum):
    """Where the runner of an attempt is, as far as the executor can tell."""

    #: No runner exists (never launched, or the executor does not know it).
    NONE = "none"
    #: Created but not running yet: being scheduled, pulling its image, or stuck.
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: Removed by someone other than this controller before it finished.
    DELETED = "deleted"


class KillReason(str, enum.Enum):
    """Why an executor stopped a runner, which says what its exit means."""

    #: Over its memory limit (local executor): reported as OOM-killed.
    OOM = "oom"
    #: Past JOB_DEADLINE_SECONDS (local executor): reported as timed out.
    DEADLINE = "deadline"
    #: The controller asked (`Executor.delete`): cancelled, stale, or stuck Pending.
    DELETE = "delete"
    #: The controller is shutting down (local executor: its children go with it).
    SHUTDOWN = "shutdown"
    #: A previous controller's runner found at start-up (local executor).
    ORPHAN = "orphan"


class StopReason(str, enum.Enum):
    """Why the sweep stopped a runner whose row is no longer its attempt's (metrics label
    `why` of dharma_runner_deletions_total; a stuck runner's failure reason is the other)."""

    CANCELLED = "cancelled"
    ROW_MOVED_ON = "row_moved_on"


#: Container waiting reasons that mean the image cannot be pulled.
IMAGE_PULL_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
#: Waiting reasons that mean the pod spec cannot be satisfied (missing Secret/ConfigMap, ...).
CONFIG_ERROR_REASONS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)
#: Observation.reason values with a meaning of their own (besides Kubernetes' own reasons).
REASON_OOM = "OOMKilled"
REASON_DEADLINE = "DeadlineExceeded"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_CONTROLLER_RESTARTED = "ControllerRestarted"
#: The kubelet evicted the pod (its own ephemeral storage over the limit, or the node short
#: of disk or memory); `Observation.message` carries the kubelet's words, which tell which.
REASON_EVICTED = "Evicted"
#: The executor could not create the runner and retrying the same spec cannot help.
REASON_INVALID = "Invalid"
#: A runner with this attempt's name exists but belongs to something else: never adopted.
REASON_FOREIGN = "Foreign"


@dataclass(frozen=True)
class Observation:
    """What an executor knows about the runner of one attempt.

    `since` is when the current phase began (for PENDING: when the runner was created, which
    is what the pending timeout counts from; for NONE: when launching first failed, if it
    did). `waiting_reason`/`message` explain a PENDING runner (ErrImagePull, Unschedulable,
    CreateContainerConfigError, ...); for a finished runner `reason` is the container's or
    Job's reason (OOMKilled, DeadlineExceeded, Error) and `message` its termination message.
    """

    phase: Phase
    runner_name: str | None = None
    since: dt.datetime | None = None
    waiting_reason: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    image: str | None = None
    #: The memory limit the runner ran with (Kubernetes quantity), for OOM messages/retries.
    memory_limit: str | None = None
    #: The deadline the runner ran with, for "timed out after N s".
    deadline_seconds: int | None = None
    #: What was deleted, for DELETED ("Job", "pod", "process").
    deleted_kind: str | None = None


NOT_FOUND = Observation(Phase.NONE)
