"""The runner's error hierarchy, drawn in one module (httpx style).

Every failure the runner anticipates is one of three kinds, matching the exit codes in
`dharma_common.contract`: permanent (retrying cannot help), temporary (retry later), fenced
(this attempt no longer owns the job, so it must change nothing). The message of each is the
one line the controller records on the job row, so it says what happened and to which file.
"""

from __future__ import annotations

from dharma_common.contract import ExitCode


class RunnerError(Exception):
    """Base class; `exit_code` tells the controller how to treat the attempt."""

    exit_code: ExitCode = ExitCode.TEMPORARY


class PermanentError(RunnerError):
    """Bad input or configuration: the same attempt would fail the same way again."""

    exit_code = ExitCode.PERMANENT


class TemporaryError(RunnerError):
    """An outside system misbehaved (network, server, database): worth another attempt."""

    exit_code = ExitCode.TEMPORARY


class FencedOut(RunnerError):
    """The job row is no longer owned by this attempt (newer attempt, cancellation)."""

    exit_code = ExitCode.FENCED


class BadMediaError(PermanentError):
    """The source file is not usable media (empty, corrupt, no streams, over the limits)."""


class WebDAVError(RunnerError):
    """Base for WebDAV failures; concrete classes are permanent or temporary."""


class WebDAVPermanentError(WebDAVError, PermanentError):
    """401/403/404 and other client errors: a wrong path or wrong credentials."""


class WebDAVTemporaryError(WebDAVError, TemporaryError):
    """5xx, 429, timeouts, refused connections, after retries ran out."""


class ToolError(TemporaryError):
    """FFmpeg or whisper failed in a way that does not point at the input."""
