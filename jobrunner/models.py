"""Which whisper model file an attempt uses, and the check that it is the file the catalog
names (dharma_common/models.py).

Why at the start of every attempt: a model is mounted from the image or from a volume an
operator fills (a PersistentVolumeClaim, an image volume). A truncated copy, a file replaced
by another model of the same name or a volume that lost its file would otherwise show up as
a crash inside whisper.cpp, or worse as a transcript in the wrong language or of poor
quality. Hashing the file before the media is downloaded turns each of these into one
permanent failure whose message names the model, the path and both checksums. It costs a
read of the file (0.3 s for the 148 MB base model here, docs/operations.md "Models"), which
also leaves it in the page cache for whisper's load right after.

The file is the catalog entry's, below WHISPER_MODELS_DIR: the name (from the controller's
WHISPER_MODEL, itself from the job's row) is only ever a key of the catalog, never a path.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from jobrunner.errors import PermanentError
from jobrunner.settings import RunnerSettings

log = logging.getLogger("jobrunner")

#: Hash in blocks of this size: constant memory whatever the model's size.
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelFile:
    """The model of an attempt: its catalog name and checksum, or (name and checksum None) a
    file named by path in WHISPER_MODEL that is no catalog entry's, used as is."""

    name: str | None
    path: Path
    sha256: str | None
    #: Which setting the checksum comes from, for the mismatch message.
    source: str = "WHISPER_MODELS"

    @property
    def label(self) -> str:
        return f"model {self.name}" if self.name else "model file"


def chosen_model(settings: RunnerSettings) -> ModelFile:
    """The model WHISPER_MODEL names (validated against the catalog at start-up)."""
    catalog = settings.WHISPER_MODELS
    root = settings.WHISPER_MODELS_DIR
    value = settings.WHISPER_MODEL
    entry = catalog.get(value)
    if entry is not None:
        return ModelFile(value, root / entry.file, entry.sha256)
    if "/" not in value:  # not reached: the settings refuse a name the catalog lacks
        raise PermanentError(f"WHISPER_MODEL {value!r} is neither a catalog name nor a path")
    path = Path(value)
    # The image's WHISPER_MODEL=/models/ggml-base.bin is the catalog's `base`: checked.
    name = next((n for n, known in sorted(catalog.items()) if root / known.file == path), None)
    if settings.WHISPER_MODEL_SHA256:
        # The image says what it baked (Dockerfile.worker); an image built with another file
        # under the catalog's name (the test images) is checked against its own checksum.
        return ModelFile(name, path, settings.WHISPER_MODEL_SHA256, "WHISPER_MODEL_SHA256")
    if name is not None:
        return ModelFile(name, path, catalog[name].sha256)
    return ModelFile(None, path, None)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed in BLOCK_BYTES blocks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(BLOCK_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def verify_model(model: ModelFile) -> None:
    """A missing file or a checksum other than the catalog's is permanent: the same volume
    or image would give every retry the same file."""
    if not model.path.is_file():
        raise PermanentError(
            f"{model.label}: {model.path} does not exist (WHISPER_MODELS_DIR, WHISPER_MODEL)"
        )
    if model.sha256 is None:
        log.info(
            "model file named by path: not in the catalog, not verified",
            extra={"action": "model_unverified", "model_path": str(model.path)},
        )
        return
    start = time.perf_counter()
    try:
        actual = file_sha256(model.path)
    except OSError as exc:
        raise PermanentError(f"{model.label}: {model.path} cannot be read: {exc}") from None
    seconds = time.perf_counter() - start
    if actual != model.sha256:
        raise PermanentError(
            f"{model.label}: {model.path} has sha256 {actual}, "
            f"{'the catalog' if model.source == 'WHISPER_MODELS' else 'the image'} says "
            f"{model.sha256} ({model.source})"
        )
    log.info(
        "model verified",
        extra={"action": "model_verified", "model": model.name, "model_path": str(model.path),
               "seconds": round(seconds, 3)},
    )  # fmt: skip
