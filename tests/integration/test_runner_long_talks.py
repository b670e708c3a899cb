"""Long talks are transcribed in windows (jobrunner/windows.py): real whisper.cpp with the
real tiny.en model, on a talk made of the speech sample with a pause after each sentence.

The window is made as short as the settings allow (30 s), so a 150 s talk is cut several
times; the cuts must fall in the pauses, and the subtitles must be the same lines at the same
times as one whole-file run: nothing doubled, nothing lost at a cut, times on the talk's
clock. (The runner's memory under a pod's limit is proven on the real node:
tests/realnode/test_real_pods.py::test_long_talk_fits_a_small_memory_limit.)
"""

from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

from devtools.media import JFK, MODELS
from jobrunner.subtitles import Segment, clean_segments
from jobrunner.transcribe import SILENCE_DBFS, WhisperCpp, pcm_levels
from jobrunner.windows import Cuts, plan_windows

pytestmark = pytest.mark.integration

MODEL = MODELS / "ggml-tiny.en.bin"
#: The sample is 11.0 s; each copy is followed by 1.5 s of silence.
PERIOD_MS, SPEECH_MS, COPIES = 12_500, 11_000, 12
LINE = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"  # noqa: E501


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z ]", " ", text.lower()).split()


def _transcribe(pcm: Path, window_seconds: int) -> list[Segment]:
    model = WhisperCpp(MODEL, threads=2, window_seconds=window_seconds)
    progress: list[float] = []
    segments = model.transcribe(pcm, "en", progress.append, lambda: False)
    assert progress and progress == sorted(progress) and progress[-1] <= 1.0
    return clean_segments(segments)


@pytest.mark.skipif(not MODEL.exists(), reason="no real model present")
def test_windowed_transcript_equals_the_whole_file_one(tmp_path: Path) -> None:
    pcm = _make_talk(tmp_path)
    levels = pcm_levels(pcm)
    windows = plan_windows(levels.tolist(), SILENCE_DBFS, Cuts.for_seconds(30))
    assert len(windows) >= 5, windows
    for cut in [w.start_ms for w in windows[1:]]:
        assert SPEECH_MS <= cut % PERIOD_MS < PERIOD_MS, f"cut at {cut} ms is inside speech"

    whole = _transcribe(pcm, window_seconds=3600)
    windowed = _transcribe(pcm, window_seconds=30)

    # The same words: each sentence once per copy, none doubled or lost at a cut.
    assert _words(" ".join(s.text for s in windowed)) == _words(LINE) * COPIES
    assert _words(" ".join(s.text for s in whole)) == _words(LINE) * COPIES
    # Lines in order, never overlapping, none across a cut, all on the talk's clock.
    for before, after in itertools.pairwise(windowed):
        assert before.start_ms <= before.end_ms <= after.start_ms
    for seg in windowed:
        assert any(w.start_ms <= seg.start_ms <= seg.end_ms <= w.end_ms for w in windows), seg
    # Each copy's first line starts where the copy does (whisper's own precision: 1 s).
    starts = [s.start_ms for s in windowed if _words(s.text)[:2] == ["and", "so"]]
    assert len(starts) == COPIES
    for copy, start in enumerate(starts):
        assert abs(start - copy * PERIOD_MS) <= 1_000, (copy, start)


def _make_talk(directory: Path) -> Path:
    """16 kHz mono s16le: the sample then 1.5 s of silence, `COPIES` times (150 s)."""
    pcm = directory / "audio.pcm"
    pause = (PERIOD_MS - SPEECH_MS) / 1000
    inputs: list[str] = []
    for _ in range(COPIES):
        inputs += ["-i", str(JFK)]
    chain = "".join(f"[{i}:a]apad=pad_dur={pause}[a{i}];" for i in range(COPIES))
    chain += "".join(f"[a{i}]" for i in range(COPIES)) + f"concat=n={COPIES}:v=0:a=1[out]"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *inputs,
         "-filter_complex", chain, "-map", "[out]",
         "-ac", "1", "-ar", "16000", "-f", "s16le", str(pcm)],
        check=True,
    )  # fmt: skip
    return pcm
