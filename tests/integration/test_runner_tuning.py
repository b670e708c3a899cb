"""The tuning settings chosen by bench/tuning.py take effect in the real jobrunner process.

No timing is asserted: the runner's own log says which way it ran. With the video
re-encoded, the default converts the source before whisper starts (OVERLAP_VIDEO_ENCODE off,
docs/performance.md table 1); a stream copy still runs beside whisper; and the decoder
strategy that whisper.cpp actually holds is logged, so WHISPER_BEAM_SIZE is visible. While
whisper waits for the encode, the runner still watches its fence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools.log_actions import check_action, lines_with_action, read_until_action
from devtools.media import MEDIA_CACHE, make_long_talk
from devtools.services import WebDAVServer
from dharma_common.contract import ExitCode
from tests.conftest import Queue
from tests.integration.runner import run_jobrunner, start_jobrunner

pytestmark = pytest.mark.integration


def _events(queue: Queue, env: dict[str, str], kind: str) -> list[dict[str, Any]]:
    job = queue.job(kind)
    result = run_jobrunner(env, job.job_id, job.attempt)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stderr.splitlines()]


def _order(events: list[dict[str, Any]]) -> list[str]:
    wanted = (check_action("source_converted"), check_action("transcription_started"))
    return [e["action"] for e in events if e.get("action") in wanted]


def _event(events: list[dict[str, Any]], action: str) -> dict[str, Any]:
    return next(e for e in events if e.get("action") == check_action(action))


def test_reencoded_video_is_converted_before_whisper_starts_by_default(
    queue: Queue, runner_env: dict[str, str]
) -> None:
    events = _events(queue, runner_env, "vp9_opus_webm")
    assert _event(events, "plan")["overlap"] is False
    assert _order(events) == ["source_converted", "transcription_started"]
    decoding = _event(events, "whisper_decoding")
    assert decoding == decoding | {
        "threads": 2, "strategy": "WHISPER_SAMPLING_GREEDY", "beam_size": 0,
        "flash_attn": True, "audio_ctx": 0,  # docs/performance.md, models and quantization
        # PyPI's wheel here: CPU code built in, no OpenBLAS (the image's: jobrunner/backends.py)
        "cpu_backend": "built-in", "blas": False,
    }  # fmt: skip


def test_overlap_and_beam_search_when_configured(queue: Queue, runner_env: dict[str, str]) -> None:
    runner_env["OVERLAP_VIDEO_ENCODE"] = "true"
    runner_env["WHISPER_BEAM_SIZE"] = "5"
    runner_env["WHISPER_THREADS"] = "1"
    events = _events(queue, runner_env, "vp9_opus_webm")
    assert _event(events, "plan")["overlap"] is True
    assert _order(events) == ["transcription_started", "source_converted"]
    decoding = _event(events, "whisper_decoding")
    assert decoding == decoding | {
        "threads": 1, "strategy": "WHISPER_SAMPLING_BEAM_SEARCH", "beam_size": 5,
    }  # fmt: skip


def test_stream_copy_still_runs_beside_whisper(queue: Queue, runner_env: dict[str, str]) -> None:
    events = _events(queue, runner_env, "h264_aac_mp4")
    plan = _event(events, "plan")
    assert plan["copy_video"] is True and plan["overlap"] is True
    assert _order(events) == ["transcription_started", "source_converted"]


def test_cancelled_while_encoding_stops_before_transcribing(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    """With the encode no longer beside whisper, no progress is written while it runs; the
    runner checks its fence between waits instead, and a cancelled job stops there."""
    job = queue.job(make_long_talk(MEDIA_CACHE, 40, "640x360", "vp9"))
    runner_env["X264_PRESET"] = "medium"  # a long encode to cancel in the middle of
    dav.faults.clear()
    proc = start_jobrunner(runner_env, job.job_id, job.attempt)
    assert proc.stderr is not None
    seen = read_until_action(proc.stderr, "plan")
    queue.row("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s RETURNING id",
              job.job_id)  # fmt: skip
    seen += proc.stderr.readlines()
    assert proc.wait(timeout=120) == ExitCode.FENCED, "".join(seen)
    message = Path(runner_env["TERMINATION_MESSAGE_PATH"]).read_text()
    assert "no longer owned by this attempt" in message
    assert not lines_with_action(seen, "transcription_started")
    assert [r for r in dav.faults.log if r.method != "GET"] == []
    assert list(scratch.iterdir()) == []
