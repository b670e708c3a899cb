"""Structured logs: one JSON object per line, carrying the job id, media id and attempt.

Context is held in a contextvar so every line logged while handling one attempt carries
its identity without threading it through every call (kopf's per-object log context).

Every line the project logs also carries a stable `action` (`job_claimed`, `runner_launched`,
`attempt_succeeded`, ...: procrastinate's `action`), passed as `extra={"action": ...}`.
The message (`event`) is for people and may be reworded; the action is for programs (tests,
benches, log queries) and changes only deliberately. It is enforced by a test that reads the
source (tests/unit/test_log_actions.py, devtools/log_actions.py), not by this formatter:
libraries (urllib3, kubernetes) log without one, and a forgotten key must fail in CI, never
cost a log line in production. Tests that wait for a line check the action exists first, so
renaming one fails at once instead of timing out.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import logging
import sys
from collections.abc import Iterator
from typing import Any

import orjson

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "dharma_log_context", default=None
)

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields (job_id, media_id, attempt, ...) to every log line inside the block."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in fields.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    """The fields bound by enclosing `log_context` blocks (copied for threads)."""
    return dict(_context.get() or {})


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON line: time, level, logger, action, event, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        action = record.__dict__.get("action")
        if action is not None:
            payload["action"] = action
        payload["event"] = record.getMessage()
        payload.update(_context.get() or {})
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        # orjson: 27 -> 23 µs per whole log call measured alone (the controller writes ~3
        # lines per Job). What it cannot encode natively becomes str().
        return orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def configure_logging(level: str = "INFO") -> None:
    """Send JSON lines to stderr (stdout stays free for command output)."""
    # What the JSON lines never show is not gathered for every record (the logging HOWTO's
    # "Optimization": caller's file and line, thread, process): at 20 Jobs/s the controller
    # writes 60 lines a second.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: keep their warnings, drop their per-request noise.
    for name in ("urllib3", "kubernetes", "wsgidav", "cheroot", "pywhispercpp"):
        logging.getLogger(name).setLevel(logging.WARNING)
