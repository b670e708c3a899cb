"""`dharma-jobrunner run --job-id N --attempt K`: process one claimed attempt and exit.

Exit 0 on success; otherwise the exit code is the error class (dharma_common.contract) and
one line a person can act on is written to the termination-message file, which Kubernetes
shows in the pod's status and the controller copies onto the job row.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from dharma_common.contract import (
    ATTEMPT_OPTION,
    JOB_ID_OPTION,
    RUN_COMMAND,
    RUNNER_PROGRAM,
    ExitCode,
    one_line,
    termination_message_path,
)
from dharma_common.logs import configure_logging
from dharma_common.settings import ConfigError, load_settings
from jobrunner.errors import RunnerError
from jobrunner.settings import RunnerSettings

log = logging.getLogger("jobrunner")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=RUNNER_PROGRAM,
        description="Process one claimed Dharma Stream job attempt: download the source from "
        "WebDAV, encode MP4/M4A/HLS once, transcribe with whisper.cpp, upload, and record "
        "subtitles. Configuration comes from the environment (see docs/operations.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(RUN_COMMAND, help="process one attempt and exit")
    run.add_argument(
        JOB_ID_OPTION, dest="job_id", type=_positive, required=True, help="dharma.stt_jobs.id"
    )
    run.add_argument(
        ATTEMPT_OPTION, dest="attempt", type=_positive, required=True,
        help="the attempt number the controller claimed (the row's `attempts`): the fencing token",
    )  # fmt: skip
    return parser


def _report(message: str) -> None:
    """Write the one-line reason where Kubernetes (or the local executor) reads it."""
    path = termination_message_path()
    try:
        path.write_text(one_line(message) + "\n", encoding="utf-8")
    except OSError as exc:
        log.warning(
            "termination message not written",
            extra={
                "action": "termination_message_not_written",
                "path": str(path),
                "error": str(exc),
            },
        )


def describe_crash(exc: BaseException) -> tuple[str, list[str]]:
    """The one line and the stack for an exception nobody anticipated — without its text.
    An unexpected exception may quote anything it touched (UnicodeEncodeError quoted a
    character of the WebDAV password and its position), and the line is copied onto the
    job row and into the logs. Its type and where it was raised are enough to find the bug;
    the stack lists file, line and function only, never values."""
    frames = traceback.extract_tb(exc.__traceback__)
    stack = [f"{f.filename}:{f.lineno} in {f.name}" for f in frames]
    where = f" at {stack[-1].rsplit('/', 1)[-1]}" if stack else ""
    return f"internal error in the jobrunner: {type(exc).__name__}{where}", stack


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(RunnerSettings)
    except ConfigError as exc:
        configure_logging()
        message = f"runner configuration error: {exc}"
        log.error(message, extra={"action": "config_error"})
        _report(message)
        return ExitCode.PERMANENT
    configure_logging(settings.LOG_LEVEL)

    from jobrunner.pipeline import run_attempt

    try:
        run_attempt(settings, args.job_id, args.attempt)
    except RunnerError as exc:
        log.error(
            "attempt failed",
            extra={
                "action": "run_failed",
                "job_id": args.job_id,
                "attempt": args.attempt,
                "error_class": exc.exit_code.name.lower(),
                "error": str(exc),
            },
        )
        _report(str(exc))
        return exc.exit_code
    except Exception as exc:  # a bug: still say something useful, still clean up
        message, stack = describe_crash(exc)
        log.error(
            "attempt crashed",
            extra={
                "action": "run_crashed",
                "job_id": args.job_id,
                "attempt": args.attempt,
                "error": message,
                "stack": stack,
            },
        )
        _report(message)
        return ExitCode.TEMPORARY
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
