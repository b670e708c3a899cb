"""The `action` keys of the production code's log lines, read from its source.

Every log call in controller/, jobrunner/ and dharma_common/ passes a literal
`extra={"action": "snake_case_key", ...}` (dharma_common/logs.py says why). This module finds
those calls with `ast`, so that tests/unit/test_log_actions.py can hold every call to it, and
so that a test waiting for a log line can refuse an action no code logs: a renamed action
fails at once, instead of turning a failure into a timeout.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("controller", "jobrunner", "dharma_common")
LEVELS = frozenset({"debug", "info", "warning", "error", "critical", "exception", "log"})
ACTION = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


@dataclass(frozen=True)
class LogCall:
    path: Path
    line: int
    #: The literal action, or None when the call has none (or not a literal one).
    action: str | None


def _is_logger(node: ast.expr) -> bool:
    """`log.info(...)`, `logger.info(...)`, `logging.info(...)`, `logging.getLogger().info(...)`."""
    if isinstance(node, ast.Name):
        return node.id in {"log", "logger", "logging"}
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "getLogger"
    )


def _action(call: ast.Call) -> str | None:
    for keyword in call.keywords:
        if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
            for key, value in zip(keyword.value.keys, keyword.value.values, strict=True):
                if (
                    isinstance(key, ast.Constant)
                    and key.value == "action"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    return value.value
    return None


def log_calls(root: Path = REPO) -> Iterator[LogCall]:
    """Every logging call of the production packages, with its action."""
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS
                    and _is_logger(node.func.value)
                ):
                    yield LogCall(path.relative_to(root), node.lineno, _action(node))


@functools.cache
def known_actions() -> frozenset[str]:
    """Every action the production code logs."""
    return frozenset(call.action for call in log_calls() if call.action)


def check_action(action: str) -> str:
    """`action`, if some production log call uses it; else a failure naming the known ones."""
    if action not in known_actions():
        raise AssertionError(
            f"no log call has action {action!r} (renamed?); known: {sorted(known_actions())}"
        )
    return action


def lines_with_action(text: str | Iterable[str], action: str) -> list[dict[str, Any]]:
    """The JSON log lines of `text` (a process's stderr) whose action is `action`."""
    check_action(action)
    found = []
    for line in text.splitlines() if isinstance(text, str) else text:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("action") == action:
                    found.append(record)
    return found


def read_until_action(stream: Iterable[str], action: str) -> list[str]:
    """Read a process's stderr line by line up to the first line with `action` (included);
    the lines read. Fails if the stream ends first (the process exited without logging it)."""
    check_action(action)
    seen = []
    for line in stream:
        seen.append(line)
        if lines_with_action([line], action):
            return seen
    raise AssertionError(f"the process ended without logging {action!r}:\n{''.join(seen)}")
