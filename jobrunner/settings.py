"""The runner's configuration (DESIGN.md "Configuration contract"), validated at start-up."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from dharma_common.models import BASE_MODEL, Catalog, default_catalog, unknown_model
from dharma_common.settings import DatabaseSettings
from jobrunner.errors import PermanentError
from jobrunner.script import Script, check_prompt, parse_language

_BITRATE = r"^[1-9][0-9]*[kKmM]?$"
#: whisper's initial prompt per language unless WHISPER_PROMPTS says otherwise: a short
#: Simplified sentence with full-width punctuation, whose script and punctuation whisper's
#: Chinese output follows (docs/performance.md, "Chinese script and prompts").
DEFAULT_PROMPTS = {"zh": "以下是普通话的句子，使用简体中文和标点符号。"}


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
    #: The model catalog, JSON {name: {"file", "sha256", "memory"}} (dharma_common/models.py);
    #: the same value as the controller's. Default: the image's `base`.
    WHISPER_MODELS: Annotated[Catalog, NoDecode] = Field(default_factory=default_catalog)
    #: The directory the catalog's files are relative to (the image's models; a volume the
    #: chart mounts is at /models/volume).
    WHISPER_MODELS_DIR: Path = Path("/models")
    #: The model of a job that names none: a catalog name, or (as before the catalog) the
    #: path of a ggml file, which is used as is, unverified, unless it is a catalog entry's
    #: file. The controller sets it for a job whose row names its model.
    WHISPER_MODEL: str = Field(default=BASE_MODEL, min_length=1, max_length=4096)
    #: The SHA-256 of the file WHISPER_MODEL names by path, as the image that baked it says
    #: (Dockerfile.worker sets both); checked instead of the catalog's (jobrunner/models.py).
    WHISPER_MODEL_SHA256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    #: A whisper language, or a Chinese tag naming the script (zh-Hans, zh-TW; script.py).
    WHISPER_LANGUAGE: str = "zh"
    #: The script Chinese transcripts are written in when the language tag names none
    #: (jobrunner/script.py; docs/performance.md "Chinese script and prompts").
    CHINESE_SCRIPT: Script = Script.SIMPLIFIED
    #: whisper's initial prompt per language, JSON {"zh": "..."}; a job's `initial_prompt`
    #: column wins; a language not listed gets none.
    WHISPER_PROMPTS: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_PROMPTS)
    )
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
    WHISPER_WINDOW_SECONDS: int = Field(default=300, ge=30, le=3600)
    #: Transcription may take TRANSCRIBE_BUDGET_FLOOR_SECONDS + this x the seconds of audio
    #: whisper is given; beyond it the attempt fails permanently with the budget named
    #: (jobrunner/transcribe.py Budget; docs/performance.md "Hard audio").
    TRANSCRIBE_BUDGET_FACTOR: float = Field(default=1.0, gt=0, le=100)
    TRANSCRIBE_BUDGET_FLOOR_SECONDS: float = Field(default=120.0, ge=0, le=86400)
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

    @field_validator("WHISPER_MODEL")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        """A name must be in the catalog (validated before it: `info.data`); a value with a
        `/` is a file's path (the configuration of releases before the catalog)."""
        catalog = info.data.get("WHISPER_MODELS")
        if "/" in value or catalog is None or value in catalog:
            return value
        raise ValueError(unknown_model(value, catalog) + ", or the path of a ggml file")

    @field_validator("WHISPER_LANGUAGE")
    @classmethod
    def _language(cls, value: str) -> str:
        parse_language(value)  # a LanguageError is a ValueError naming the value
        return value

    @field_validator("WHISPER_PROMPTS", mode="before")
    @classmethod
    def _prompts_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(
                    f'must be JSON ({exc}), e.g. {{"zh": "以下是普通话的句子。"}}'
                ) from None
        return value

    @field_validator("WHISPER_PROMPTS")
    @classmethod
    def _prompts(cls, value: dict[str, str]) -> dict[str, str]:
        for language, prompt in value.items():
            parsed = parse_language(language)
            if parsed.script is not None or parsed.whisper == "auto":
                raise ValueError(f"{language!r}: keys are whisper languages such as zh or en")
            try:
                check_prompt(prompt, f"the prompt for {language!r}")
            except PermanentError as exc:
                raise ValueError(str(exc)) from None
        return value

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
