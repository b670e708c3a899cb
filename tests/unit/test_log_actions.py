"""Every log line of the production code carries a stable `action` key (dharma_common/logs.py),
and tests match on it rather than on the wording of the message."""

from __future__ import annotations

import json
import logging

import pytest

from devtools.log_actions import (
    ACTION,
    PACKAGES,
    REPO,
    check_action,
    known_actions,
    log_calls,
)
from dharma_common.logs import JsonFormatter


def test_every_log_call_has_a_literal_snake_case_action() -> None:
    calls = list(log_calls())
    assert len(calls) > 50  # the scan finds the calls at all
    missing = [f"{c.path}:{c.line}" for c in calls if c.action is None]
    assert missing == [], "log calls without extra={'action': '...'}"
    malformed = [f"{c.path}:{c.line}: {c.action}" for c in calls
                 if c.action and not ACTION.fullmatch(c.action)]  # fmt: skip
    assert malformed == []


def test_a_module_logger_is_named_log() -> None:
    """The scan recognises `log.<level>(...)`: a logger bound to another name would escape it."""
    unscanned = [
        f"{path.relative_to(REPO)}:{number}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "= logging.getLogger(" in line
        and not line[:1].isspace()
        and not line.startswith("log =")
    ]
    assert unscanned == []


def test_the_actions_tests_rely_on_exist() -> None:
    assert {"job_claimed", "runner_launched", "attempt_succeeded", "run_succeeded",
            "plan"} <= known_actions()  # fmt: skip
    with pytest.raises(AssertionError, match="renamed"):
        check_action("attempt succeeded")


def test_the_formatter_puts_the_action_before_the_message() -> None:
    record = logging.LogRecord("controller", logging.INFO, __file__, 1, "claimed", None, None)
    record.action = "job_claimed"
    line = JsonFormatter().format(record)
    assert list(json.loads(line))[:5] == ["ts", "level", "logger", "action", "event"]
    bare = logging.LogRecord("urllib3", logging.WARNING, __file__, 1, "retrying", None, None)
    assert "action" not in json.loads(JsonFormatter().format(bare))
