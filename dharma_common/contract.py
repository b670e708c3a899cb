"""The contract between the controller and the jobrunner.

The runner never sets a job's final status; it tells the controller how an attempt ended
through its exit code (the error class) and a one-line termination message (what a person
should do). Both sides import these constants so they can never drift apart.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path

#: Where Kubernetes reads a container's termination message; the local executor overrides it.
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
#: Kubernetes truncates termination messages at 4096 bytes; keep well under it.
MAX_TERMINATION_MESSAGE_BYTES = 1024


class ExitCode(enum.IntEnum):
    """Runner exit codes. Anything not listed (a crash, a signal) counts as temporary."""

    OK = 0
    #: Retrying cannot help: bad media, missing source, forbidden path, bad configuration.
    PERMANENT = 10
    #: Worth retrying later: a server was unreachable, a transfer failed, the database restarted.
    TEMPORARY = 11
    #: This attempt no longer owns the row (a newer attempt or a cancellation): nothing to record.
    FENCED = 12


class JobStatus(str, enum.Enum):
    """`dharma.stt_jobs.status` (the CHECK constraint of migration 0001 lists the same five).

    A job is `pending` until a controller claims it, `processing` while one attempt owns it
    (fenced on `attempts`), then `completed` or `failed` (or `cancelled` by an operator).
    The controller, the runner, the metrics and the queries' parameters all use these."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ErrorClass(str, enum.Enum):
    """How the controller treats a failed attempt."""

    PERMANENT = "permanent"
    TEMPORARY = "temporary"
    FENCED = "fenced"


def classify_exit_code(code: int | None) -> ErrorClass:
    """Map a runner exit code to the way the controller must treat it."""
    if code == ExitCode.PERMANENT:
        return ErrorClass.PERMANENT
    if code == ExitCode.FENCED:
        return ErrorClass.FENCED
    return ErrorClass.TEMPORARY


def one_line(message: str, limit: int = MAX_TERMINATION_MESSAGE_BYTES) -> str:
    """Collapse a message to one line of at most `limit` UTF-8 bytes (never splitting a char)."""
    text = " ".join(message.split())
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[: limit - 3].decode("utf-8", errors="ignore") + "..."


# The runner's command line, `dharma-jobrunner run --job-id N --attempt K`: built here for the
# Kubernetes Job (the console script) and the local executor (`python -m jobrunner`, no install
# needed), parsed by jobrunner/cli.py from the same names.
RUNNER_PROGRAM = "dharma-jobrunner"
RUNNER_MODULE = "jobrunner"
RUN_COMMAND = "run"
JOB_ID_OPTION = "--job-id"
ATTEMPT_OPTION = "--attempt"


def runner_arguments(job_id: int, attempt: int) -> list[str]:
    """The runner's arguments for one attempt: `run --job-id N --attempt K`."""
    return [RUN_COMMAND, JOB_ID_OPTION, str(job_id), ATTEMPT_OPTION, str(attempt)]


def runner_command(job_id: int, attempt: int, python: str | None = None) -> list[str]:
    """The whole command: the console script, or `python -m jobrunner` with `python`."""
    program = [python, "-m", RUNNER_MODULE] if python else [RUNNER_PROGRAM]
    return [*program, *runner_arguments(job_id, attempt)]


def termination_message_path() -> Path:
    """The file the runner writes its one-line reason to (env TERMINATION_MESSAGE_PATH)."""
    return Path(os.environ.get("TERMINATION_MESSAGE_PATH") or DEFAULT_TERMINATION_MESSAGE_PATH)


# Labels put on every Kubernetes Job and pod of an attempt, so that
# `kubectl logs -l dharma.stream/media-id=<uuid>` finds every run of one media file.
LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB_ID = "dharma.stream/job-id"
LABEL_MEDIA_ID = "dharma.stream/media-id"
LABEL_ATTEMPT = "dharma.stream/attempt"
#: Which installation made the Job: `<INSTANCE_NAME>-<8 hex of the database's installation id>`
#: (controller/jobspec.py `Instance`). A controller watches, adopts and deletes only its own.
LABEL_INSTANCE = "dharma.stream/instance"
APP_NAME = "dharma-stream"
RUNNER_COMPONENT = "jobrunner"
MANAGED_BY = "dharma-controller"
