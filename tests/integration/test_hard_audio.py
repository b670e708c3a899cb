"""Hard audio and the transcription budget (issue 12, item 2), with the real whisper.cpp.

- Every case of the generated hard-audio corpus (`devtools.hardaudio`: music, noise, bells,
  chanting, synthetic voices, sparse words, speech over music) goes through the runner's
  `WhisperCpp` with the real multilingual model and the runner's default budget: each ends
  with subtitles or with the budget's permanent error, within the budget (plus the abort
  callback's reaction time), never a runaway.
- A real runner given a tiny budget fails permanently, with the budget named in its
  termination message and log; under the local controller that message is on the job row.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.controller_helpers import ControllerProcess
from devtools.hardaudio import BY_NAME, CASES, make_case, to_pcm
from devtools.media import MODELS
from dharma_common.contract import ExitCode
from jobrunner.errors import PermanentError
from jobrunner.settings import DEFAULT_PROMPTS, RunnerSettings
from jobrunner.transcribe import Budget, WhisperCpp
from tests.conftest import Queue
from tests.integration.runner import run_jobrunner

pytestmark = pytest.mark.integration

BASE = MODELS / "ggml-base.bin"
#: How late whisper may notice its abort callback: it polls it between graph computations
#: (well under a second on the base model), plus the window that was being read.
ABORT_LATENCY = 10.0
_TINY = {"TRANSCRIBE_BUDGET_FACTOR": "0.001", "TRANSCRIBE_BUDGET_FLOOR_SECONDS": "0"}
_MESSAGE = (
    "transcription exceeded its budget of 0 s for 11 s of audio (TRANSCRIBE_BUDGET_FACTOR=0.001"
)


@pytest.fixture(scope="module")
def whisper() -> WhisperCpp:
    """The real base model with the runner's default decoding and budget, loaded once."""
    fields = RunnerSettings.model_fields
    budget = Budget(
        fields["TRANSCRIBE_BUDGET_FACTOR"].default,
        fields["TRANSCRIBE_BUDGET_FLOOR_SECONDS"].default,
    )
    return WhisperCpp(BASE, threads=2, window_seconds=300, budget=budget)


@pytest.mark.skipif(not BASE.exists(), reason="no multilingual model")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_hard_audio_ends_within_the_budget(
    whisper: WhisperCpp, media_dir: Path, tmp_path: Path, name: str
) -> None:
    case = BY_NAME[name]
    pcm = tmp_path / f"{name}.pcm"
    seconds = to_pcm(make_case(name, media_dir / "hardaudio"), pcm)
    assert 10 <= seconds <= 30, "the corpus keeps its cases short"
    assert whisper.budget is not None
    allowed = whisper.budget.seconds(seconds)  # the gate only shortens what whisper is given
    started = time.monotonic()
    try:
        segments = whisper.transcribe(
            pcm, case.language, lambda _f: None, lambda: False,
            prompt=DEFAULT_PROMPTS.get(case.language, ""),
        )  # fmt: skip
    except PermanentError as exc:
        assert str(exc).startswith("transcription exceeded its budget of"), exc
        assert name != "clean_speech", "clean speech must never exceed the budget"
    else:
        assert all(s.end_ms <= seconds * 1000 + 1000 for s in segments)
        if name == "clean_speech":
            text = " ".join(s.text for s in segments).lower()
            assert text.count("ask not what your country can do for you") == 2, text
    assert time.monotonic() - started <= allowed + ABORT_LATENCY


def test_a_tiny_budget_fails_the_runner_permanently_with_the_budget_named(
    queue: Queue, runner_env: dict[str, str]
) -> None:
    """The weightless model still takes longer than 11 ms on jfk.wav: the abort callback
    stops whisper and the attempt ends permanent, the message naming budget and setting."""
    runner_env.update(_TINY)
    job = queue.job("audio_wav")
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.PERMANENT, result.stderr
    assert result.message.startswith(_MESSAGE), result.message
    over = result.event("transcription_over_budget")
    assert (over["budget_seconds"], round(over["speech_seconds"])) == (0, 11)
    assert result.event("whisper_decoding")["budget_seconds"] == 0.0
    assert not result.events("run_succeeded")
    rows = queue.rows("SELECT 1 FROM dharma.subtitles WHERE media_id = %s", job.media_id)
    assert rows == []


@pytest.mark.timeout(180)
def test_the_budget_message_is_on_the_job_row(
    queue: Queue,
    controller_env: dict[str, str],
    start_controller: Callable[..., ControllerProcess],
) -> None:
    """Under the local controller: failed at once (permanent: no retry), the runner's
    budget message recorded on the row for the operator."""
    controller_env.update(_TINY)
    job_id = queue.enqueue(queue.add_media("audio_wav"))
    controller = start_controller(controller_env, "--exit-when-idle")
    assert controller.wait(timeout=150) == 0
    state, attempts, reason, message = queue.row(
        "SELECT status, attempts, failure_reason, error_message FROM dharma.stt_jobs WHERE id = %s",
        job_id,
    )
    assert (state, attempts, reason) == ("failed", 1, "runner_error_permanent")
    assert message.startswith(_MESSAGE), message
