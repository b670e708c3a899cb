"""Where to cut a long talk into transcription windows — a pure function of loudness.

Why windows: whisper.cpp holds the whole input as float32 samples plus its mel spectrogram,
and the runner held an int16 copy, a float32 copy and float64 temporaries beside it: about
0.9 GB per hour of audio, so a three-hour talk was OOM-killed (issue 10, "Long talks"). The
runner now reads the PCM file one window at a time, so its memory is set by the window
length, not by the talk's.

Why these cuts: a cut inside a word loses or doubles it, so a window ends at the quietest
half second near its maximum length — in a talk, the pause between two sentences. Windows
never overlap, so no line can appear twice, and every audible moment belongs to exactly
one window, so none is dropped. Long silences (a guided meditation, a break) are not given
to whisper at all: it costs a full 30-second pass per window and invents text on silence.

Positions are counted in 100 ms level frames (`transcribe.window_levels`), so every window
starts on a whole millisecond and moving a window's subtitle times to the talk's clock is
exact integer arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from jobrunner.subtitles import Segment

#: Milliseconds per level frame.
FRAME_MS = 100
#: Samples per level frame at whisper's 16 kHz.
FRAME_SAMPLES = 1600


@dataclass(frozen=True)
class Cuts:
    """How windows are chosen, in level frames."""

    #: The longest window (WHISPER_WINDOW_SECONDS x 10).
    max_frames: int
    #: How far before `max_frames` to look for the quietest moment.
    search_frames: int
    #: A silent run at least this long ends a window; whisper never sees it.
    gap_frames: int = 300
    #: Silence kept before a window's first and after its last audible frame, so whisper
    #: hears a word's soft onset and tail.
    pad_frames: int = 10
    #: Frames averaged when looking for the quietest moment (half a second: a pause, not
    #: the gap between two syllables).
    smooth_frames: int = 5

    @classmethod
    def for_seconds(cls, window_seconds: int) -> Cuts:
        frames = window_seconds * 1000 // FRAME_MS
        return cls(max_frames=frames, search_frames=max(1, min(frames // 4, 600)))


@dataclass(frozen=True)
class Window:
    """Frames [start, end) of the talk."""

    start: int
    end: int

    @property
    def start_ms(self) -> int:
        return self.start * FRAME_MS

    @property
    def end_ms(self) -> int:
        return self.end * FRAME_MS

    @property
    def start_sample(self) -> int:
        return self.start * FRAME_SAMPLES

    @property
    def end_sample(self) -> int:
        return self.end * FRAME_SAMPLES


def _power(level: float) -> float:
    return 0.0 if level == float("-inf") else 10 ** (level / 10)


def _quietest(levels: Sequence[float], lo: int, hi: int, smooth: int) -> int:
    """The frame in [lo, hi) at the centre of the quietest `smooth`-frame stretch; the
    latest such frame on ties, so windows stay as long as allowed."""
    best, best_at = float("inf"), hi - 1
    half = smooth // 2
    for centre in range(lo, hi):
        first, last = max(0, centre - half), min(len(levels), centre - half + smooth)
        energy = sum(_power(levels[i]) for i in range(first, last)) / max(1, last - first)
        if energy <= best:
            best, best_at = energy, centre
    return best_at


def plan_windows(levels: Sequence[float], threshold: float, cuts: Cuts) -> list[Window]:
    """Cut a talk into windows, given the dBFS level of each 100 ms frame.

    Rules, in order, from the current position:
    1. skip to the first audible frame (at or above `threshold`); none left: done;
    2. the window starts `pad_frames` before it (never before the current position);
    3. it ends at the first silent run of `gap_frames` (plus `pad_frames` of it), if that
       comes before `max_frames`;
    4. else, if the talk ends within `max_frames`, at the last audible frame plus padding;
    5. else at the quietest moment of the last `search_frames` before `max_frames`.
    """
    count = len(levels)
    audible = [level >= threshold for level in levels]
    windows: list[Window] = []
    pos = 0
    while True:
        first = next((i for i in range(pos, count) if audible[i]), None)
        if first is None:
            return windows
        start = max(pos, first - cuts.pad_frames)
        limit = min(count, start + cuts.max_frames)
        end = _end_at_gap(audible, first, limit, cuts)
        if end is None:
            if limit == count:
                last = max(i for i in range(first, count) if audible[i])
                end = min(count, last + 1 + cuts.pad_frames)
            else:
                lo = max(first + 1, limit - cuts.search_frames)
                end = _quietest(levels, lo, limit, cuts.smooth_frames)
                end = max(end, first + 1)
        windows.append(Window(start, end))
        pos = end


def _end_at_gap(audible: Sequence[bool], first: int, limit: int, cuts: Cuts) -> int | None:
    """The end of a window that meets a long silence before `limit`, else None."""
    run = 0
    for i in range(first, limit):
        run = 0 if audible[i] else run + 1
        if run == cuts.gap_frames:
            silence_start = i - run + 1
            return min(silence_start + cuts.pad_frames, limit)
    return None


def to_talk_time(segments: Iterable[Segment], window: Window) -> list[Segment]:
    """Move a window's segments (times from the window's start) onto the talk's clock,
    clamped to the window: whisper may round a last timestamp past the audio it was given,
    and a time beyond the cut would overlap the next window's first line."""
    placed = []
    for seg in segments:
        start = min(window.start_ms + max(0, seg.start_ms), window.end_ms)
        end = min(window.start_ms + max(0, seg.end_ms), window.end_ms)
        placed.append(replace(seg, start_ms=start, end_ms=max(start, end)))
    return placed
