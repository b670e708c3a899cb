"""Programs run on untrusted media get no credentials (DESIGN.md "Least privilege for
runners"; issue 10).

The runner's environment holds DB_PASSWORD and WEBDAV_PASSWORD; FFmpeg and ffprobe parse
whatever was uploaded, so an exploit in a demuxer runs with their environment. Both are
started here through the runner's own code (`FFmpegProcess`, `run_ffprobe`) with a stand-in
program — a real child process — that reports the environment it was given.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from jobrunner.ffmpeg import FFmpegProcess
from jobrunner.probe import run_ffprobe

#: What the runner's environment carries and a child must not see.
SECRETS = {
    "DB_PASSWORD": "db-secret-value",
    "WEBDAV_PASSWORD": "dav-secret-value",
    "DB_USER": "dharma_runner_login",
    "WEBDAV_USER": "uploader",
    "DB_HOST": "db.internal",
}
ALLOWED = {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}

_DUMP_ENV = "import json, os, sys; sys.{stream}.write(json.dumps(dict(os.environ)))"


@pytest.fixture
def runner_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _check(env: dict[str, str], workdir: Path) -> None:
    # Python may add LC_CTYPE when it coerces the C locale; nothing else may appear.
    assert set(env) - {"LC_CTYPE"} <= ALLOWED, sorted(env)
    assert not [v for v in SECRETS.values() if v in json.dumps(env)]
    assert env["HOME"] == env["TMPDIR"] == str(workdir)
    assert env["PATH"]


@pytest.mark.usefixtures("runner_environment")
def test_ffmpeg_child_sees_no_credentials(tmp_path: Path) -> None:
    log = tmp_path / "main.log"
    code = _DUMP_ENV.format(stream="stderr")
    proc = FFmpegProcess([sys.executable, "-c", code], log, "dump its environment")
    proc.wait()
    _check(json.loads(log.read_text()), tmp_path)


@pytest.mark.usefixtures("runner_environment")
def test_ffprobe_child_sees_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_ffprobe runs `ffprobe` from PATH: a stand-in that prints its environment as the
    JSON ffprobe would print."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "ffprobe"
    fake.write_text(f"#!{sys.executable}\n{_DUMP_ENV.format(stream='stdout')}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    workdir = tmp_path / "attempt"
    workdir.mkdir()
    env = run_ffprobe(workdir / "source.mp4")
    _check(env, workdir)
