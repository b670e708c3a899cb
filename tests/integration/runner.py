"""Run the real `dharma-jobrunner` as a subprocess, the way both executors do."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.log_actions import lines_with_action
from dharma_common.contract import runner_command


@dataclass
class RunResult:
    code: int
    message: str
    stderr: str

    def events(self, action: str) -> list[dict[str, Any]]:
        """The runner's log lines with this `action` (devtools/log_actions.py)."""
        return lines_with_action(self.stderr, action)

    def event(self, action: str) -> dict[str, Any]:
        """The first log line with this `action`; a failure showing stderr if there is none."""
        found = self.events(action)
        assert found, f"no {action!r} line in the runner's log:\n{self.stderr}"
        return found[0]


def jobrunner_command(job_id: int, attempt: int) -> list[str]:
    """`dharma-jobrunner run` for one attempt, with this interpreter (no install needed)."""
    return runner_command(job_id, attempt, python=sys.executable)


def start_jobrunner(env: dict[str, str], job_id: int, attempt: int) -> subprocess.Popen[str]:
    """Start the runner in the background, its JSON log lines readable from `stderr` (tests
    that must act in the middle of a run: SIGTERM, cancellation)."""
    return subprocess.Popen(
        jobrunner_command(job_id, attempt), env=env, stderr=subprocess.PIPE, text=True
    )


def run_jobrunner(
    env: dict[str, str], job_id: int, attempt: int, timeout: float = 300
) -> RunResult:
    termination = Path(env["TERMINATION_MESSAGE_PATH"])
    termination.unlink(missing_ok=True)
    proc = subprocess.run(
        jobrunner_command(job_id, attempt),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    message = termination.read_text(encoding="utf-8").strip() if termination.exists() else ""
    return RunResult(proc.returncode, message, proc.stderr)
