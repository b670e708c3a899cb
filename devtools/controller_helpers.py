"""Shared helpers for the controller's integration and end-to-end tests and the benchmarks:
run the real `dharma-controller run` as a subprocess, poll rows, and read its JSON logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from devtools.log_actions import check_action

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def eventually(
    probe: Callable[[], T | None], what: str, timeout: float = 60.0, interval: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy; the timeout only bounds a failure."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class ControllerProcess:
    """`python -m controller run ...` with its stderr (JSON logs) in a file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "run", *args],
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=self._log,
            stderr=self._log,
            cwd=REPO,
        )

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines

    def events(self, action: str, **fields: Any) -> list[dict[str, Any]]:
        """The log lines with this `action` (never the message's wording) and these fields;
        an action no code logs fails at once rather than leaving a caller waiting."""
        check_action(action)
        return [
            line for line in self.logs()
            if line.get("action") == action and all(line.get(k) == v for k, v in fields.items())
        ]  # fmt: skip

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL: a crash; nothing in the controller runs afterwards."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait: the clean shutdown path."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None


def process_alive(pid: int) -> bool:
    """Is `pid` a live (non-zombie) process?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
