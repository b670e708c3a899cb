"""Running FFmpeg: argument lists only (never a shell), an environment without credentials
(`tool_env`), its last error line kept as the reason, and a child that is always reaped —
killed if we are interrupted."""

from __future__ import annotations

import subprocess
from pathlib import Path

from jobrunner.errors import BadMediaError, TemporaryError, ToolError
from jobrunner.probe import last_error_line, tool_env


class FFmpegProcess:
    """An FFmpeg run in the background (it encodes while whisper transcribes)."""

    def __init__(self, cmd: list[str], log_path: Path, what: str) -> None:
        self.what = what
        self._log_path = log_path
        self._log = log_path.open("wb")
        try:
            # No credentials for a program parsing untrusted media: a scrubbed environment.
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                env=tool_env(log_path.parent),
            )  # fmt: skip
        except FileNotFoundError:
            self._log.close()
            raise ToolError("ffmpeg is not installed in this image") from None

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._log.close()

    def finished(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; True once FFmpeg has exited (then call `wait`)."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wait(self) -> None:
        """Wait for FFmpeg; a failure quotes FFmpeg's own reason."""
        try:
            code = self._proc.wait()
        finally:
            self._log.close()
        if code == 0:
            return
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        reason = last_error_line(text, self._log_path.parent)
        if code < 0:
            raise TemporaryError(f"ffmpeg ({self.what}) was killed by signal {-code}")
        if "No space left on device" in reason:
            raise TemporaryError(f"ffmpeg ({self.what}) ran out of scratch space: {reason}")
        raise BadMediaError(f"ffmpeg could not {self.what}: {reason}")


def run_ffmpeg(cmd: list[str], log_path: Path, what: str) -> None:
    proc = FFmpegProcess(cmd, log_path, what)
    try:
        proc.wait()
    except BaseException:
        proc.kill()
        raise
