"""A job's whisper model through the controller and the local executor, end to end (issue 12,
item 3): real PostgreSQL, real WsgiDAV, the real jobrunner as the controller's subprocess, and
the real tiny.en model from a models directory the catalog describes.

- a job naming a catalog model runs on that model's file, checked by checksum, with the
  model's memory as its limit, and its speech becomes subtitles;
- a file whose checksum is not the catalog's fails the job permanently, both checksums on
  the row;
- a job naming a model the catalog lacks fails permanently without a runner.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.controller_helpers import ControllerProcess
from devtools.media import TINY_EN, TINY_EN_SHA256
from tests.conftest import Queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

Start = Callable[..., ControllerProcess]
#: Not tiny.en's: the checksum of the image's official base model.
OTHER_SHA256 = "60ed5bc3dd14eea856493d334349b405782ddcaf0028d4b5df4088345fba2efe"
needs_tiny = pytest.mark.skipif(not TINY_EN.exists(), reason="no real tiny.en model present")


def models_env(
    controller_env: dict[str, str], models: Path, sha256: str = TINY_EN_SHA256
) -> dict[str, str]:
    """The controller's (and so its runners') environment with a catalog of one real model
    below `models`; WHISPER_MODEL (a job without a model) stays the weightless test model."""
    models.mkdir(exist_ok=True)
    (models / "volume").mkdir(exist_ok=True)
    link = models / "volume" / TINY_EN.name
    if not link.exists():
        link.symlink_to(TINY_EN)
    catalog = {
        "tiny.en": {"file": f"volume/{TINY_EN.name}", "sha256": sha256, "memory": "900Mi"},
        "base": {"file": "ggml-base.bin", "sha256": OTHER_SHA256},
    }
    return {**controller_env, "WHISPER_MODELS": json.dumps(catalog),
            "WHISPER_MODELS_DIR": str(models)}  # fmt: skip


def enqueue(queue: Queue, model: str) -> int:
    media_id = queue.add_media("audio_wav")
    job_id: int = queue.row(
        "INSERT INTO dharma.stt_jobs (media_id, language, model) VALUES (%s, 'en', %s)"
        " RETURNING id", media_id, model,
    )[0]  # fmt: skip
    return job_id


def outcome(queue: Queue, job_id: int) -> tuple[str, int, str | None, str | None]:
    row: tuple[str, int, str | None, str | None] = queue.row(
        "SELECT status, attempts, failure_reason, error_message FROM dharma.stt_jobs"
        " WHERE id = %s", job_id,
    )  # fmt: skip
    return row


def run_one(
    queue: Queue, start_controller: Start, env: dict[str, str], model: str, timeout: float
) -> tuple[int, ControllerProcess]:
    """Queue one job naming `model` and serve it with a controller that exits when idle."""
    job_id = enqueue(queue, model)
    controller = start_controller(env, "--exit-when-idle")
    assert controller.wait(timeout=timeout) == 0
    return job_id, controller


@needs_tiny
def test_a_job_on_a_catalog_model_runs_on_its_checked_file(
    queue: Queue, controller_env: dict[str, str], start_controller: Start, tmp_path: Path
) -> None:
    env = models_env(controller_env, tmp_path / "models")
    job_id, controller = run_one(queue, start_controller, env, "tiny.en", 200)
    assert outcome(queue, job_id) == ("completed", 1, None, None)
    text = " ".join(r[0] for r in queue.rows(
        "SELECT text FROM dharma.subtitles s JOIN dharma.stt_jobs j USING (media_id)"
        " WHERE j.id = %s ORDER BY start_time_ms", job_id)).lower()  # fmt: skip
    assert "ask not what your country can do for you" in text.replace(",", "")
    # The model's memory, not RUNNER_MEMORY_LIMIT (256Mi in these tests), is the limit.
    [started] = controller.events("runner_process_started", job_id=job_id)
    assert started["memory_limit_bytes"] == 900 * 2**20
    [verified] = controller.events("model_verified", job_id=job_id)
    assert verified["model"] == "tiny.en"
    assert verified["model_path"] == str(tmp_path / "models" / "volume" / TINY_EN.name)


@needs_tiny
def test_a_model_file_with_another_checksum_fails_permanently(
    queue: Queue, controller_env: dict[str, str], start_controller: Start, tmp_path: Path
) -> None:
    env = models_env(controller_env, tmp_path / "models", sha256=OTHER_SHA256)
    job_id, _ = run_one(queue, start_controller, env, "tiny.en", 120)
    path = tmp_path / "models" / "volume" / TINY_EN.name
    assert outcome(queue, job_id) == (
        "failed", 1, "runner_error_permanent",
        f"model tiny.en: {path} has sha256 {TINY_EN_SHA256}, the catalog says {OTHER_SHA256} "
        "(WHISPER_MODELS)",
    )  # fmt: skip
    assert not queue.rows("SELECT 1 FROM dharma.subtitles s JOIN dharma.stt_jobs j"
                          " USING (media_id) WHERE j.id = %s", job_id)  # fmt: skip
    # Checked before the source was downloaded: nothing was uploaded either.
    assert not list(queue.dav.root.rglob("*.vtt"))


def test_a_job_naming_an_unknown_model_fails_without_a_runner(
    queue: Queue, controller_env: dict[str, str], start_controller: Start, tmp_path: Path
) -> None:
    env = models_env(controller_env, tmp_path / "models")
    job_id, controller = run_one(queue, start_controller, env, "large-v3", 60)
    assert outcome(queue, job_id) == (
        "failed", 1, "unknown_model",
        "model 'large-v3' is not in the model catalog (WHISPER_MODELS); known models: base, "
        "tiny.en",
    )  # fmt: skip
    assert queue.row("SELECT runner_name FROM dharma.stt_jobs WHERE id = %s", job_id) == (None,)
    assert not controller.events("runner_process_started")
    assert controller.events("attempt_failed", job_id=job_id, failure_reason="unknown_model")
