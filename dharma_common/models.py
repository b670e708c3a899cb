"""The whisper model catalog (`WHISPER_MODELS`), shared by the controller and the runner.

Why a catalog: a job may name its model (`dharma.stt_jobs.model`), and a name from a row must
never become a path. The catalog is deployment configuration, the same JSON in both programs'
environments (the chart renders it into both ConfigMaps): each name maps to the model's file
(relative to the runner's models directory, `WHISPER_MODELS_DIR`), its SHA-256 (the runner
checks it at the start of every attempt, so a truncated or swapped file is a clear permanent
error rather than a crash or silent nonsense) and, optionally, the memory a runner with that
model needs (the controller's memory request and first limit for a job naming the model).

    WHISPER_MODELS='{"base": {"file": "ggml-base.bin", "sha256": "60ed...", "memory": "2Gi"},
                     "small": {"file": "volume/ggml-small.bin", "sha256": "1be3...",
                               "memory": "3Gi"}}'

Names and file paths are checked here, once, at start-up: a name is what the row's CHECK
constraint admits (migration 0009), a file is a relative path whose parts start with a letter
or digit (no `..`, no absolute path, nothing hidden), so the file a runner opens is always
inside its models directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

#: A model's name: on the row (CHECK constraint of migration 0009), in `jobs enqueue --model`,
#: in the catalog. Letters, digits, `.`, `_`, `-` ("tiny.en", "large-v3", "small-q5_1").
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: A file below the models directory: relative, every part starting with a letter or digit.
MODEL_FILE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$"
#: A Kubernetes memory quantity (the controller parses it again with parse_bytes).
MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?(k|Ki|M|Mi|G|Gi|T|Ti)?$"
#: The model the runner image bakes in (Dockerfile.worker, WHISPER_MODEL_NAME and
#: WHISPER_MODEL_SHA256): whisper.cpp's official multilingual base model. No `memory`: a job
#: on it is sized by RUNNER_MEMORY_REQUEST/RUNNER_MEMORY_LIMIT, as before the catalog.
BASE_MODEL = "base"
BASE_FILE = "ggml-base.bin"
BASE_SHA256 = "60ed5bc3dd14eea856493d334349b405782ddcaf0028d4b5df4088345fba2efe"
#: What `WHISPER_MODELS` holds when it is not set (as JSON, for docs and the chart's test).
DEFAULT_CATALOG_JSON = json.dumps({BASE_MODEL: {"file": BASE_FILE, "sha256": BASE_SHA256}})
#: An example for error messages.
_EXAMPLE = '{"base": {"file": "ggml-base.bin", "sha256": "<64 hex>", "memory": "2Gi"}}'


class ModelEntry(BaseModel):
    """One model of the catalog."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Relative to the runner's WHISPER_MODELS_DIR (`/models` in the image; a volume the chart
    #: mounts is below it at `/models/volume`).
    file: str = Field(max_length=255, pattern=MODEL_FILE_PATTERN)
    #: Lower-case hex; the runner hashes the file at the start of each attempt.
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    #: The runner's memory with this model (request and first limit); None: the deployment's
    #: RUNNER_MEMORY_REQUEST/RUNNER_MEMORY_LIMIT.
    memory: str | None = Field(default=None, pattern=MEMORY_PATTERN)


def _catalog_json(value: Any) -> Any:
    """JSON text to a mapping (an empty value: the default catalog); bad JSON is a
    ValueError, which load_settings turns into a message naming WHISPER_MODELS."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return json.loads(DEFAULT_CATALOG_JSON)
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise ValueError(f"must be JSON ({exc}), e.g. {_EXAMPLE}") from None
    if not isinstance(parsed, dict) or not parsed:
        raise ValueError(f"must be a JSON object with at least one model, e.g. {_EXAMPLE}")
    return parsed


ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
#: The field type of WHISPER_MODELS in both settings classes (with NoDecode).
Catalog = Annotated[dict[ModelName, ModelEntry], BeforeValidator(_catalog_json)]


def default_catalog() -> dict[str, ModelEntry]:
    return {name: ModelEntry(**entry) for name, entry in json.loads(DEFAULT_CATALOG_JSON).items()}


def is_model_name(value: str) -> bool:
    return re.fullmatch(MODEL_NAME_PATTERN, value) is not None


def unknown_model(name: str, catalog: Mapping[str, ModelEntry]) -> str:
    """The message of a job naming a model the catalog does not have."""
    known = ", ".join(sorted(catalog)) or "none"
    return f"model {name!r} is not in the model catalog (WHISPER_MODELS); known models: {known}"
