"""Turning an exception into one short line for a log field or a probe's answer.

`str(exc).splitlines()[0]` raises IndexError for an exception with an empty message
(`OSError()`, `urllib3.exceptions.ProtocolError()`), and doing that inside an except handler
killed the thread that was handling the error. Every such place uses `first_line`.
"""

from __future__ import annotations

#: Long enough for an API server's or PostgreSQL's one-line reason, short enough for a log.
MAX_CHARS = 300


def first_line(exc: BaseException, limit: int = MAX_CHARS) -> str:
    """The first non-blank line of `exc`'s message (stripped, at most `limit` characters),
    or the exception's class name when the message is empty."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
