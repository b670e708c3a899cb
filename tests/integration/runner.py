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


def run_jobrunner(
    env: dict[str, str], job_id: int, attempt: int, timeout: float = 300
) -> RunResult:
    termination = Path(env["TERMINATION_MESSAGE_PATH"])
    termination.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "jobrunner", "run", "--job-id", str(job_id)]
    proc = subprocess.run(
        [*cmd, "--attempt", str(attempt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    message = termination.read_text(encoding="utf-8").strip() if termination.exists() else ""
    return RunResult(proc.returncode, message, proc.stderr)
