"""Test-only fault hooks: crash the controller at the moments crash-safety is about.

Production code never reads the environment for these: `dharma-controller run` asks
`FaultHooks.from_environment()` once, which returns None unless a variable below is set to
exactly "1", and hands the result to the `Service` and the executor it builds. Every crash
point is `if self._faults: self._faults.crash(Fault.X)`, so with no hooks (production) there
is nothing to trigger. The end-to-end and integration tests set the variables on a controller
subprocess to SIGKILL it

- `DHARMA_FAULT_CRASH_AFTER_CLAIM=1`: right after a claim committed, before any runner was
  created (the restart must launch exactly one runner for that attempt);
- `DHARMA_FAULT_CRASH_AFTER_SPAWN=1` (local executor): right after a runner process was
  started, before its pid file was written (the restart must find and stop it, never run
  that attempt again);
- `DHARMA_FAULT_CRASH_BEFORE_RECORD=1`: right before an attempt's outcome is written (the
  runner has finished; the restart must record it exactly once).

SIGKILL, not an exception: nothing in the process gets to clean up, as in a real crash.
Unit tests pass hooks with their own `kill` to see which crash point a pass reaches.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping

log = logging.getLogger(__name__)


class Fault(str, enum.Enum):
    """A crash point; the value is the variable that enables it."""

    CRASH_AFTER_CLAIM = "DHARMA_FAULT_CRASH_AFTER_CLAIM"
    CRASH_AFTER_SPAWN = "DHARMA_FAULT_CRASH_AFTER_SPAWN"
    CRASH_BEFORE_RECORD = "DHARMA_FAULT_CRASH_BEFORE_RECORD"


def _sigkill_self() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class FaultHooks:
    """The enabled crash points of one controller process."""

    def __init__(self, enabled: Iterable[Fault], kill: Callable[[], None] = _sigkill_self):
        self.enabled = frozenset(enabled)
        self._kill = kill

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> FaultHooks | None:
        """The hooks the environment enables (warned about loudly), or None: production."""
        env = os.environ if environ is None else environ
        enabled = [fault for fault in Fault if env.get(fault.value) == "1"]
        for fault in enabled:
            log.warning(
                "TEST FAULT INJECTION ENABLED: never set this in production",
                extra={"action": "fault_injection_enabled", "fault": fault.value},
            )
        return cls(enabled) if enabled else None

    def crash(self, fault: Fault) -> None:
        """Kill this process (SIGKILL) if `fault` is enabled."""
        if fault in self.enabled:
            log.critical("fault injection: killing the controller",
                         extra={"action": "fault_injected", "fault": fault.value})  # fmt: skip
            self._kill()
