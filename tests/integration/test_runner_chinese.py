"""Chinese script and prompts through the whole real runner (issue 12, item 1): Mandarin
speech (espeak-ng) transcribed by the real multilingual model, the same audio asked for in
Traditional and in Simplified; the subtitle rows and the WebVTT file are in the requested
script and say the same thing; a job's own initial prompt reaches whisper."""

from __future__ import annotations

import shutil
from pathlib import Path

import psycopg2.errors
import pytest

from devtools.media import MODELS, WEIGHTLESS_MODEL, make_mandarin_speech
from devtools.services import WebDAVServer
from jobrunner.script import Script, han_share_changed
from jobrunner.settings import DEFAULT_PROMPTS
from jobrunner.transcribe import WhisperCpp
from tests.conftest import Job, Queue
from tests.integration.runner import RunResult, run_jobrunner

pytestmark = pytest.mark.integration

#: Two short sentences keep the base model's run short on a loaded machine.
SENTENCES = ("今天我们学习佛经。", "这个问题很重要，请大家认真听讲。")
JOB_PROMPT = "以下是法師的開示，講到佛經。"


def _vtt_text(vtt: str) -> list[str]:
    """The cue texts of a WebVTT document (our renderer: number, timing, text, blank)."""
    blocks = vtt.split("\n\n")[1:]
    return [b.split("\n", 2)[2] for b in blocks if b.strip() and " --> " in b]


def _transcribe(
    queue: Queue, env: dict[str, str], dav: WebDAVServer, source: Path, language: str,
    prompt: str | None = None,
) -> tuple[Job, RunResult, list[str]]:  # fmt: skip
    job = queue.job(source, language=language)
    if prompt is not None:
        with queue.conn.cursor() as cur:
            cur.execute(
                "UPDATE dharma.stt_jobs SET initial_prompt = %s WHERE id = %s",
                (prompt, job.job_id),
            )
    result = run_jobrunner(env, job.job_id, job.attempt, timeout=900)
    assert result.code == 0, result.stderr
    rows = [r[0] for r in queue.rows(
        "SELECT text FROM dharma.subtitles WHERE media_id = %s ORDER BY start_time_ms",
        job.media_id)]  # fmt: skip
    vtt = dav.path(f"talks/2510/{job.media_id}/subtitles.vtt").read_text(encoding="utf-8")
    assert _vtt_text(vtt) == rows  # the rows and the WebVTT file are the same text
    return job, result, rows


@pytest.mark.skipif(not (MODELS / "ggml-base.bin").exists(), reason="no multilingual model")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_same_mandarin_audio_in_traditional_and_simplified(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, media_dir: Path
) -> None:
    source = make_mandarin_speech(media_dir, SENTENCES)
    runner_env["WHISPER_MODEL"] = str(MODELS / "ggml-base.bin")
    runner_env["WHISPER_LANGUAGE"] = "zh"
    runner_env["CHINESE_SCRIPT"] = "as-written"  # the tags below must decide

    _, hant, traditional = _transcribe(queue, runner_env, dav, source, "zh-Hant", JOB_PROMPT)
    _, hans, simplified = _transcribe(queue, runner_env, dav, source, "zh-Hans")

    text_t, text_s = "".join(traditional), "".join(simplified)
    han_t, simplified_in_t = han_share_changed(text_t, Script.TRADITIONAL)
    han_s, traditional_in_s = han_share_changed(text_s, Script.SIMPLIFIED)
    assert han_t >= 5 and han_s >= 5, (traditional, simplified)
    assert simplified_in_t == 0, f"Simplified characters in the zh-Hant rows: {traditional}"
    assert traditional_in_s == 0, f"Traditional characters in the zh-Hans rows: {simplified}"

    # What whisper was given: the job's own prompt for zh-Hant, the setting's for zh-Hans.
    started = hant.event("run_started")
    assert (started["language"], started["script"]) == ("zh", "traditional")
    assert (started["prompt_origin"], started["prompt_chars"]) == ("job", len(JOB_PROMPT))
    assert hant.event("whisper_decoding")["prompt_chars"] == len(JOB_PROMPT)
    started = hans.event("run_started")
    assert (started["script"], started["prompt_origin"]) == ("simplified", "setting")
    assert hans.event("whisper_decoding")["prompt_chars"] == len(DEFAULT_PROMPTS["zh"])


@pytest.mark.skipif(not (MODELS / "ggml-base.bin").exists(), reason="no multilingual model")
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_auto_job_whose_speech_is_chinese_is_written_in_the_deployment_script(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, media_dir: Path
) -> None:
    """`auto` cannot know the language before the run, but whisper detects it per window:
    a window detected as Chinese is converted to CHINESE_SCRIPT like a `zh` job's. The base
    model writes this Mandarin in Simplified characters (with or without a prompt), so
    Traditional rows show the conversion happened."""
    source = make_mandarin_speech(media_dir, SENTENCES)
    runner_env["WHISPER_MODEL"] = str(MODELS / "ggml-base.bin")
    runner_env["CHINESE_SCRIPT"] = "traditional"

    _, result, rows = _transcribe(queue, runner_env, dav, source, "auto")

    han, simplified = han_share_changed("".join(rows), Script.TRADITIONAL)
    assert han >= 5, rows
    assert simplified == 0, f"Simplified characters in an auto job's rows: {rows}"
    assert result.event("window_language_detected")["language"] == "zh"
    assert result.event("run_started")["script"] == "traditional"


def test_bad_language_tag_and_prompt_fail_permanently(
    queue: Queue, runner_env: dict[str, str], media_dir: Path
) -> None:
    """Hostile values end in the clear permanent error, before anything is downloaded."""
    from dharma_common.contract import ExitCode

    job = queue.job("audio_mp3", language="zh_TW;--")
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.PERMANENT, result.stderr
    assert "'zh_TW;--' is not a language tag" in result.message
    job = queue.job("audio_mp3", language="zh-Hant")
    with queue.conn.cursor() as cur:
        cur.execute(
            "UPDATE dharma.stt_jobs SET initial_prompt = %s WHERE id = %s",
            ("\x1b]0;owned\x07", job.job_id),
        )
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.PERMANENT and "control characters" in result.message
    # The database refuses an over-long prompt when it is written (migration 0008).
    with pytest.raises(psycopg2.errors.CheckViolation), queue.conn.cursor() as cur:
        cur.execute(
            "UPDATE dharma.stt_jobs SET initial_prompt = %s WHERE id = %s", ("字" * 401, job.job_id)
        )


def test_prompt_is_given_to_the_first_window_only(tmp_path: Path) -> None:
    """Later windows continue the previous one's tokens (no_context False) and get no prompt
    again: whisper.cpp would prepend it to the carried context of every window. The model's
    own transcribe is wrapped to record what each window was given (weightless model)."""
    import numpy as np

    rng = np.random.default_rng(7)
    burst = (rng.standard_normal(20 * 16000) * 3000).astype("<i2")
    pause = np.zeros(2 * 16000, dtype="<i2")
    pcm = tmp_path / "three-bursts.pcm"
    np.concatenate([burst, pause, burst, pause, burst]).tofile(pcm)
    whisper = WhisperCpp(WEIGHTLESS_MODEL, threads=2, window_seconds=30)
    calls: list[tuple[str, bool]] = []
    real = whisper._model.transcribe

    def recording(audio: object, **params: object) -> object:
        calls.append((str(params["initial_prompt"]), bool(params["no_context"])))
        return real(audio, **params)

    whisper._model.transcribe = recording
    whisper.transcribe(pcm, "zh", lambda f: None, lambda: False, prompt=JOB_PROMPT)
    assert len(calls) >= 2
    assert calls[0] == (JOB_PROMPT, True)
    assert all(call == ("", False) for call in calls[1:])
