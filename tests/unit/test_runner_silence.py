"""Fast tests of the defences against whisper's inventions on silence (found by the
bad-media corpus, tests/integration/test_bad_media.py): the silence gate, whisper.cpp's
"[BLANK_AUDIO]" marker, and repeats that are a speaker's, not whisper's."""

from __future__ import annotations

import numpy as np

from jobrunner.subtitles import Segment, clean_segments
from jobrunner.transcribe import SILENCE_DBFS, drop_silent, window_levels


def _audio(*parts: tuple[float, float]) -> np.ndarray:
    """Concatenated (seconds, amplitude) parts of a 440 Hz tone at 16 kHz."""
    chunks = []
    for seconds, amplitude in parts:
        t = np.arange(int(seconds * 16000)) / 16000
        chunks.append((amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    return np.concatenate(chunks)


def test_window_levels_are_dbfs_per_100_ms() -> None:
    levels = window_levels(_audio((1.0, 0.5), (0.55, 0.0)))
    assert levels.size == 16  # 1.55 s -> 16 windows, the last one padded
    assert abs(levels[0] - 20 * np.log10(0.5 / np.sqrt(2))) < 0.1  # a sine's RMS
    assert np.isneginf(levels[-1]) and levels[-1] < SILENCE_DBFS


def test_segments_over_silence_are_dropped_and_loose_ones_kept() -> None:
    # 2 s of speech-level tone, 3 s of room tone at -70 dBFS, 1 s of tone.
    levels = window_levels(_audio((2.0, 0.3), (3.0, 10 ** (-67 / 20)), (1.0, 0.3)))
    segments = [
        Segment(0, 2000, "spoken"),
        Segment(2500, 4500, "invented in the pause"),
        Segment(4500, 6000, "spoken again, starting early"),
        Segment(1900, 2100, "touches speech by one window"),
        Segment(7000, 8000, "past the end of the audio"),
    ]
    kept = drop_silent(segments, levels, SILENCE_DBFS)
    assert [s.text for s in kept] == [
        "spoken",
        "spoken again, starting early",
        "touches speech by one window",
        "past the end of the audio",  # no audio to judge by: keep it
    ]


def test_blank_audio_markers_are_not_captions() -> None:
    segments = [
        Segment(0, 10_000, " [BLANK_AUDIO]"),
        Segment(10_000, 12_000, "[MUSIC] [BLANK_AUDIO]"),
        Segment(12_000, 13_000, "[laughs] said softly"),
    ]
    assert clean_segments(segments) == [Segment(12_000, 13_000, "[laughs] said softly")]


def test_lines_that_are_only_a_bracketed_note_are_not_captions() -> None:
    """whisper learned sound captions and credits from subtitles and writes them over
    music, noise and bells (the hard-audio corpus: "(字幕:郑)" on bells, "(设计)" on chords,
    "(发声)" on pink noise): a line that is nothing but such notes is not speech. A note
    inside spoken text, and brackets that are part of what was said, stay."""
    notes = [
        "(字幕:郑)", "(设计)", "（音乐）", "【字幕】", "[Music]", "(upbeat music)",
        "♪", "♪♪ ♫", "(笑声) [掌声]", " ( Applause ) ",
    ]  # fmt: skip
    spoken = [
        "今天（上午）我们讲《金刚经》。",
        "(1) the first precept",
        "[laughs] said softly",
        "The sutra says (in Pali) sabbe satta",
    ]
    segments = [Segment(i * 1000, i * 1000 + 900, t) for i, t in enumerate(notes + spoken)]
    assert [s.text for s in clean_segments(segments)] == spoken


def test_repeats_are_collapsed_only_when_back_to_back() -> None:
    line = "Ask not what your country can do for you"
    segments = [
        Segment(0, 2000, line),
        Segment(2000, 4000, line),
        Segment(4800, 6000, line),  # a 0.8 s gap: still whisper looping
        Segment(30_000, 41_000, line),  # said again after a pause: the speaker's
    ]
    assert clean_segments(segments) == [Segment(0, 6000, line), Segment(30_000, 41_000, line)]
