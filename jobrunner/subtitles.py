"""Subtitle segments: cleaning whisper's output and rendering WebVTT."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Segment:
    """One subtitle line. `language` is the language whisper detected for the window the
    line came from, for a job that asked for `auto` (None: the job's own language); it
    decides whether the line is Chinese text to convert to the job's script."""

    start_ms: int
    end_ms: int
    text: str
    language: str | None = None


def decode_segments(
    raw: Iterable[tuple[int, int, bytes]], language: str | None = None
) -> list[Segment]:
    """Decode whisper's per-segment UTF-8 bytes as ONE stream.

    whisper.cpp cuts segments on token boundaries, and a token can end in the middle of a
    multi-byte character (common in Chinese). Decoding each segment on its own would turn
    both halves into U+FFFD; an incremental decoder carries the dangling bytes into the next
    segment instead, so every character survives intact.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for start_ms, end_ms, data in raw:
        out.append(Segment(start_ms, end_ms, decoder.decode(data), language))
    tail = decoder.decode(b"", final=True)
    if tail and out:
        out[-1] = replace(out[-1], text=out[-1].text + tail)
    return out


#: Repeats further apart than this are a speaker saying the same thing again (a refrain, a
#: chant after a pause), not whisper looping on silence, whose repeats are back to back.
_REPEAT_GAP_MS = 1000

#: A bracketed note: whisper.cpp's own markers ("[BLANK_AUDIO]"), and the sound captions and
#: credits whisper learned from subtitles and writes over music, noise and bells ("[Music]",
#: "(字幕:郑)", "♪"; Chinese ones also in full-width parentheses, U+FF08/U+FF09, and in
#: 【】). A line made only of notes is not words anyone said.
_NOTE = r"\[[^\[\]]*\]|\([^()]*\)|\uff08[^\uff08\uff09]*\uff09|【[^【】]*】|[♪♫]"
_NOT_SPEECH = re.compile(rf"(?:\s*(?:{_NOTE}))+\s*")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def clean_segments(segments: Iterable[Segment], duration_ms: int | None = None) -> list[Segment]:
    """Strip text, drop empty segments, clamp times, and collapse consecutive repeats.

    Whisper is known to hallucinate the same line over and over on silence or music; a run
    of identical consecutive lines becomes one segment spanning the whole run — but only while
    they follow each other without a gap (`_REPEAT_GAP_MS`). A segment that is only
    bracketed notes (whisper.cpp's "[BLANK_AUDIO]", sound captions such as "(字幕:郑)" or
    "[Music]") is dropped: it is not a caption of speech.
    """
    cleaned: list[Segment] = []
    for seg in segments:
        text = " ".join(seg.text.split())
        if not text or _NOT_SPEECH.fullmatch(text):
            continue
        start = max(0, seg.start_ms)
        end = max(start, seg.end_ms)
        if duration_ms is not None and duration_ms > 0:
            start, end = min(start, duration_ms), min(end, duration_ms)
        if (
            cleaned
            and _norm(cleaned[-1].text) == _norm(text)
            and start - cleaned[-1].end_ms <= _REPEAT_GAP_MS
        ):
            cleaned[-1] = replace(cleaned[-1], end_ms=max(cleaned[-1].end_ms, end))
            continue
        cleaned.append(replace(seg, start_ms=start, end_ms=end, text=text))
    return cleaned


def _timestamp(ms: int) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def _escape(text: str) -> str:
    """WebVTT cue text: `&` and `<` are markup, and `-->` would end a timing line."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_webvtt(segments: Iterable[Segment]) -> str:
    """A WebVTT document; with no segments it is just the header (a valid empty track)."""
    parts = ["WEBVTT", ""]
    for number, seg in enumerate(segments, start=1):
        parts += [str(number), f"{_timestamp(seg.start_ms)} --> {_timestamp(seg.end_ms)}"]
        parts += [_escape(seg.text), ""]
    return "\n".join(parts) + "\n"
