"""Run the real `dharma-jobrunner` as a subprocess, the way both executors do."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    code: int
    message: str
    stderr: str


def jobrunner_command(job_id: int, attempt: int) -> list[str]:
    """`dharma-jobrunner run` for one attempt, with this interpreter (no install needed)."""
    return [sys.executable, "-m", "jobrunner", "run", "--job-id", str(job_id),
            "--attempt", str(attempt)]  # fmt: skip


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
