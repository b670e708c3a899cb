"""The README's first quick-start command, `scripts/demo`, keeps working.

Runs `scripts/demo.py` (what `scripts/demo` execs after installing prerequisites, which CI
has already done) with the weightless model so it stays quick: real PostgreSQL, WsgiDAV,
`dharma-controller migrate`, and `dharma-controller run --executor local --exit-when-idle`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.media import WEIGHTLESS_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_demo_processes_the_sample_talk_end_to_end() -> None:
    env = {**os.environ, "WHISPER_MODEL": str(WEIGHTLESS_MODEL)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "job 1: completed after 1 attempt(s)" in out
    assert "/hls/playlist.m3u8" in out and "/subtitles.vtt" in out
    assert "runner: transcribe" in out
    assert "migrate (dharma-controller migrate)" in out
