"""The runner's configuration (DESIGN.md "Configuration contract"), validated at start-up."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator

from dharma_common.settings import DatabaseSettings

_BITRATE = r"^[1-9][0-9]*[kKmM]?$"


def available_cpus() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit shows up only there)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


class RunnerSettings(DatabaseSettings):
    """Everything `dharma-jobrunner run` reads from the environment."""

    WEBDAV_BASE_URL: str
    WEBDAV_USER: str = ""
    WEBDAV_PASSWORD: SecretStr = SecretStr("")
    HLS_BITRATE: str = Field(default="2000k", pattern=_BITRATE)
    HLS_SHARD_SECONDS: int = Field(default=6, ge=1, le=60)
    AUDIO_BITRATE: str = Field(default="128k", pattern=_BITRATE)
    WHISPER_MODEL: Path = Path("/models/ggml-base.bin")
    WHISPER_LANGUAGE: str = Field(default="zh", pattern=r"^([a-z]{2,3}|auto|haw|yue)$")
    WHISPER_THREADS: int = Field(default_factory=available_cpus, ge=1, le=256)
    #: x264 speed/size trade-off for sources that must be re-encoded (bench/pipeline.py).
    X264_PRESET: str = Field(
        default="veryfast",
        pattern=r"^(ultrafast|superfast|veryfast|faster|fast|medium|slow|slower|veryslow)$",
    )
    #: Beams for whisper's beam search; 0 or 1 decodes greedily (bench/tuning.py table 3).
    WHISPER_BEAM_SIZE: int = Field(default=0, ge=0, le=16)
    #: The longest stretch of audio whisper is given at once; windows end at a pause near
    #: it (jobrunner/windows.py). It bounds the runner's memory, whatever the talk's length:
    #: about 4 MB per minute of window (docs/performance.md, long talks).
    WHISPER_WINDOW_SECONDS: int = Field(default=600, ge=30, le=3600)
    #: Transcribe while x264 re-encodes the video (True) or after it (False). Stream-copy and
    #: audio-only runs always overlap: their FFmpeg pass is light. bench/tuning.py table 1.
    OVERLAP_VIDEO_ENCODE: bool = False
    SCRATCH_DIR: Path = Path("/tmp")  # noqa: S108 - a private mkdtemp() below it
    MAX_SOURCE_BYTES: int = Field(default=20 * 1024**3, ge=1)
    MAX_DURATION_SECONDS: float = Field(default=6 * 3600, gt=0)
    PROGRESS_INTERVAL_SECONDS: float = Field(default=5.0, ge=0.0)
    HTTP_TIMEOUT_SECONDS: float = Field(default=60.0, gt=0)
    HTTP_RETRIES: int = Field(default=5, ge=1, le=20)
    HTTP_BACKOFF_SECONDS: float = Field(default=1.0, ge=0.0)
    UPLOAD_CONCURRENCY: int = Field(default=4, ge=1, le=32)
    LOG_LEVEL: str = Field(default="INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$")

    @field_validator("WEBDAV_BASE_URL")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http(s) URL such as https://dav.example.org/media")
        if parts.username or parts.password:
            raise ValueError("must not contain credentials; use WEBDAV_USER/WEBDAV_PASSWORD")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")
