"""Where a long talk is cut for whisper (jobrunner/windows.py), table-tested on level
sequences, plus the streaming reads that keep the runner's memory flat in the talk's length
(jobrunner/transcribe.py `pcm_levels`, `read_samples`)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from jobrunner.subtitles import Segment
from jobrunner.transcribe import (
    SILENCE_DBFS,
    WindowBuffers,
    pcm_levels,
    read_samples,
    window_levels,
)
from jobrunner.windows import Cuts, Window, plan_windows, to_talk_time

S = -90.0  # silent frame
Q = -50.0  # audible but quiet (a pause with room tone over the threshold)
L = -20.0  # speech
CUTS = Cuts(max_frames=20, search_frames=5, gap_frames=8, pad_frames=2, smooth_frames=1)


def frames(*runs: tuple[int, float]) -> list[float]:
    out: list[float] = []
    for count, level in runs:
        out += [level] * count
    return out


@pytest.mark.parametrize(
    ("levels", "expected"),
    [
        pytest.param([], [], id="empty"),
        pytest.param(frames((50, S)), [], id="silent throughout"),
        pytest.param(frames((5, L)), [(0, 5)], id="short talk: one window"),
        pytest.param(
            frames((10, S), (5, L), (10, S)), [(8, 17)], id="silence trimmed, padding kept"
        ),
        pytest.param(
            frames((5, L), (7, S), (5, L)), [(0, 17)], id="a pause shorter than a gap stays"
        ),
        pytest.param(
            frames((5, L), (30, S), (5, L)),
            [(0, 7), (33, 40)],
            id="a long silence ends a window and is never transcribed",
        ),
        pytest.param(
            frames((16, L), (1, Q), (10, L)),
            [(0, 16), (16, 27)],
            id="speech longer than a window: cut at the quiet frame in the search range",
        ),
        pytest.param(
            frames((30, L)),
            [(0, 19), (19, 30)],
            id="no quiet moment: cut at the latest frame of the search range",
        ),
        pytest.param(
            frames((12, L), (1, Q), (15, L)),
            [(0, 19), (19, 28)],
            id="a quiet frame before the search range is not used",
        ),
    ],
)
def test_plan_windows(levels: list[float], expected: list[tuple[int, int]]) -> None:
    assert plan_windows(levels, SILENCE_DBFS, CUTS) == [Window(a, b) for a, b in expected]


def test_smoothing_prefers_a_pause_to_a_gap_between_syllables() -> None:
    cuts = Cuts(max_frames=40, search_frames=20, gap_frames=100, pad_frames=2, smooth_frames=5)
    # A 1-frame dip at 25 (between syllables) and a 5-frame pause at 30..34.
    levels = frames((25, L), (1, Q), (4, L), (5, Q), (20, L))
    first = plan_windows(levels, SILENCE_DBFS, cuts)[0]
    assert first == Window(0, 32)  # the centre of the pause


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_every_audible_frame_exactly_once(seed: int) -> None:
    """Random talks: windows are ordered, disjoint and within bounds, no window is longer
    than allowed, and every audible frame lies in exactly one window (no line can be
    transcribed twice or lost at a cut)."""
    rng = random.Random(seed)
    levels: list[float] = []
    while len(levels) < 2000:
        levels += [rng.choice([S, S, Q, L, L, L])] * rng.randint(1, 60)
    windows = plan_windows(levels, SILENCE_DBFS, CUTS)
    covered = [0] * len(levels)
    previous_end = 0
    for window in windows:
        assert previous_end <= window.start < window.end <= len(levels)
        assert window.end - window.start <= CUTS.max_frames
        for i in range(window.start, window.end):
            covered[i] += 1
        previous_end = window.end
    for i, level in enumerate(levels):
        assert covered[i] <= 1
        if level >= SILENCE_DBFS:
            assert covered[i] == 1, f"audible frame {i} is in no window"


def test_cuts_for_seconds() -> None:
    assert Cuts.for_seconds(600) == Cuts(max_frames=6000, search_frames=600)
    assert Cuts.for_seconds(30).search_frames == 75


def test_to_talk_time_moves_segments_exactly_and_clamps_to_the_window() -> None:
    window = Window(start=12_345, end=12_645)  # 1234.5 s to 1264.5 s of the talk
    segments = [
        Segment(0, 2_500, "first"),
        Segment(29_990, 31_000, "rounded past the cut"),
        Segment(31_000, 32_000, "after the cut", language="zh"),
    ]
    assert to_talk_time(segments, window) == [
        Segment(1_234_500, 1_237_000, "first"),
        Segment(1_264_490, 1_264_500, "rounded past the cut"),
        Segment(1_264_500, 1_264_500, "after the cut", language="zh"),  # detected: kept
    ]
    assert (window.start_ms, window.end_ms) == (1_234_500, 1_264_500)
    assert (window.start_sample, window.end_sample) == (12_345 * 1600, 12_645 * 1600)


def test_levels_are_read_a_block_at_a_time_and_match_the_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    samples = (rng.normal(0, 3000, 16000 * 7 + 123)).astype("<i2")
    samples[16000 * 2 : 16000 * 4] = 0  # two seconds of digital silence
    pcm = tmp_path / "audio.pcm"
    samples.tofile(pcm)
    whole = window_levels(samples.astype(np.float32) / 32768.0)
    streamed = pcm_levels(pcm, block_frames=3)  # 0.3 s blocks: many block edges
    assert streamed.shape == whole.shape == (71,)
    np.testing.assert_allclose(streamed, whole)
    part = read_samples(pcm, 16000, 16100)
    assert part.dtype == np.float32 and part.size == 100
    np.testing.assert_array_equal(part, samples[16000:16100] / np.float32(32768.0))
    assert read_samples(pcm, samples.size - 10, samples.size + 1000).size == 10
    empty = tmp_path / "empty.pcm"
    empty.write_bytes(b"")
    assert pcm_levels(empty).size == 0


def test_window_buffers_are_reused_and_read_what_read_samples_reads(tmp_path: Path) -> None:
    samples = np.random.default_rng(3).integers(-32768, 32767, 5000, dtype=np.int64)
    pcm = tmp_path / "audio.pcm"
    samples.astype("<i2").tofile(pcm)
    buffers = WindowBuffers(2000)
    first = buffers.read(pcm, 0, 2000)
    np.testing.assert_array_equal(first, read_samples(pcm, 0, 2000))
    second = buffers.read(pcm, 4000, 6000)  # past the end: the 1000 samples there are
    assert second.size == 1000 and np.shares_memory(first, second)
    np.testing.assert_array_equal(second, read_samples(pcm, 4000, 5000))
    with pytest.raises(ValueError, match="does not fit"):
        buffers.read(pcm, 0, 3000)  # never cut short in silence
