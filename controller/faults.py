"""Test-only fault hooks: crash the controller at the moments crash-safety is about.

Inert unless the variable is set to exactly "1" in the controller's environment; the
service logs a loud warning at start-up when any is set. Used by the end-to-end and
integration tests to SIGKILL the controller

- `DHARMA_FAULT_CRASH_AFTER_CLAIM=1`: right after a claim committed, before any runner was
  created (the restart must launch exactly one runner for that attempt);
- `DHARMA_FAULT_CRASH_AFTER_SPAWN=1` (local executor): right after a runner process was
  started, before its pid file was written (the restart must find and stop it, never run
  that attempt again);
- `DHARMA_FAULT_CRASH_BEFORE_RECORD=1`: right before an attempt's outcome is written (the
  runner has finished; the restart must record it exactly once).

SIGKILL, not an exception: nothing in the process gets to clean up, as in a real crash.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

CRASH_AFTER_CLAIM = "DHARMA_FAULT_CRASH_AFTER_CLAIM"
CRASH_AFTER_SPAWN = "DHARMA_FAULT_CRASH_AFTER_SPAWN"
CRASH_BEFORE_RECORD = "DHARMA_FAULT_CRASH_BEFORE_RECORD"
ALL = (CRASH_AFTER_CLAIM, CRASH_AFTER_SPAWN, CRASH_BEFORE_RECORD)

log = logging.getLogger(__name__)


def enabled() -> list[str]:
    return [name for name in ALL if os.environ.get(name) == "1"]


def crash_if(name: str) -> None:
    """SIGKILL this process if fault `name` is enabled."""
    if os.environ.get(name) == "1":
        log.critical("fault injection: killing the controller", extra={"fault": name})
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
