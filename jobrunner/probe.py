"""What is in a media file, according to ffprobe, reduced to what the pipeline decides on."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobrunner.errors import BadMediaError, ToolError

#: Codecs ffprobe reports for still images; a lone image is not a talk.
_IMAGE_CODECS = {"mjpeg", "png", "bmp", "gif", "webp", "tiff", "jpegls", "jpeg2000", "ljpeg"}

#: The demuxers a source may be read with: self-contained audio and video containers, plus
#: single-image readers so a photo is refused as a still image rather than as a format.
#: FFmpeg picks a demuxer by content, not by name, and some demuxers read *other* files or
#: URLs named inside the upload (hls, concat, image2, dash, tee, sdp...): an upload called
#: talk.mp4 that is an HLS playlist made FFmpeg read a file on the runner's disk and publish
#: it. An allow-list fails closed as FFmpeg gains demuxers; a deny-list would not.
SOURCE_DEMUXERS = (
    "mov", "matroska", "webm", "avi", "asf", "flv", "mpegts", "mpeg", "nut", "dv",
    "mp3", "aac", "ac3", "eac3", "flac", "ogg", "wav", "w64", "aiff", "caf", "amr", "wv",
    "ape", "tta",
    "png_pipe", "jpeg_pipe", "bmp_pipe", "webp_pipe", "tiff_pipe", "gif",
)  # fmt: skip

#: Input options for every FFmpeg or ffprobe reading the source: only the demuxers above,
#: and only the local file itself (no http, no pipe, no subfile, no nested protocols).
SOURCE_INPUT_OPTIONS = [
    "-protocol_whitelist", "file", "-format_whitelist", ",".join(SOURCE_DEMUXERS),
]  # fmt: skip

#: Demuxers whose whole purpose is to name other inputs; refusing them gets its own words.
_REFERRING_DEMUXERS = {"hls", "concat", "image2", "dash", "webm_dash_manifest", "imf", "sdp",
                       "rtsp", "rtp", "mpjpeg", "ffmetadata", "lavfi"}  # fmt: skip
_NOT_ON_WHITELIST = re.compile(r"^\[(\w+)[^\]]*\] Format not on whitelist", re.MULTILINE)


@dataclass(frozen=True)
class VideoStream:
    index: int
    codec: str
    pix_fmt: str
    width: int
    height: int


@dataclass(frozen=True)
class AudioStream:
    index: int
    codec: str
    channels: int


@dataclass(frozen=True)
class MediaInfo:
    format_name: str
    duration: float
    video: VideoStream | None
    audio: AudioStream | None


_POINTER = re.compile(r" @ 0x[0-9a-f]+\]")

#: Where FFmpeg and ffprobe are looked up when the runner's own PATH is unset.
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def tool_env(workdir: Path) -> dict[str, str]:
    """The whole environment of a program run on untrusted media (FFmpeg, ffprobe): PATH, a
    UTF-8 C locale, and HOME/TMPDIR in the attempt's private scratch directory — nothing
    else. The runner's own environment holds DB_PASSWORD and WEBDAV_PASSWORD; a child that
    an exploit in a demuxer takes over must find no credentials to read (DESIGN.md "Least
    privilege for runners")."""
    return {
        "PATH": os.environ.get("PATH") or _DEFAULT_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
    }


def last_error_line(stderr: str, scratch: Path | None = None, lines: int = 2) -> str:
    """FFmpeg's own reason: its last distinct error lines (the specific one, such as
    "moov atom not found", usually precedes the generic "Invalid data found"), with our
    private scratch path and memory addresses removed so the message reads cleanly."""
    found: list[str] = []
    for raw in reversed(stderr.splitlines()):
        line = _POINTER.sub("]", raw.strip())
        if scratch is not None:
            line = line.replace(f"{scratch}/", "")
        if line and line not in found:
            found.insert(0, line)
        if len(found) == lines:
            break
    return "; ".join(found) if found else "no error output"


def run_ffprobe(path: Path, timeout: float = 120.0) -> dict[str, Any]:
    """ffprobe's JSON for `path`; a file it cannot read is bad media, quoting its reason."""
    cmd = [
        "ffprobe", "-v", "error", "-hide_banner", "-print_format", "json",
        "-show_format", "-show_streams", *SOURCE_INPUT_OPTIONS, "-i", str(path),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False,
            env=tool_env(path.parent), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BadMediaError(f"ffprobe could not read the source within {timeout:.0f} s") from None
    except FileNotFoundError:
        raise ToolError("ffprobe is not installed in this image") from None
    if proc.returncode != 0:
        refused = _NOT_ON_WHITELIST.search(proc.stderr)
        if refused:
            raise BadMediaError(_refused_format(refused[1]))
        reason = last_error_line(proc.stderr, path.parent)
        raise BadMediaError(f"source is not readable media: ffprobe: {reason}")
    try:
        data: dict[str, Any] = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise BadMediaError("source is not readable media: ffprobe printed no JSON") from None
    return data


def _refused_format(demuxer: str) -> str:
    """Why a demuxer outside SOURCE_DEMUXERS was refused: FFmpeg refuses it right after
    recognising it, before it opens anything the file names."""
    if demuxer in _REFERRING_DEMUXERS:
        return (
            f"source is a {demuxer} file, which names other files or URLs, not a media "
            "recording; it was not opened"
        )
    return (
        f"source is not readable media: ffprobe: the {demuxer} format is not accepted "
        "(use a common audio or video container such as MP4, MKV, WebM, MP3 or WAV)"
    )


def _float(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return 0.0
    return result if math.isfinite(result) else 0.0


def parse_probe(data: dict[str, Any]) -> MediaInfo:
    """Pick the streams that matter: the default (else first) real video stream — cover art
    and other attached pictures are not video — and the default (else first) audio stream."""
    streams = data.get("streams") or []
    fmt = data.get("format") or {}

    def pick(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        for stream in candidates:
            if (stream.get("disposition") or {}).get("default"):
                return stream
        return candidates[0] if candidates else None

    videos = [
        s for s in streams
        if s.get("codec_type") == "video"
        and not (s.get("disposition") or {}).get("attached_pic")
    ]  # fmt: skip
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    v, a = pick(videos), pick(audios)
    video = (
        VideoStream(
            index=int(v["index"]),
            codec=str(v.get("codec_name", "")),
            pix_fmt=str(v.get("pix_fmt", "")),
            width=int(v.get("width") or 0),
            height=int(v.get("height") or 0),
        )
        if v
        else None
    )
    audio = (
        AudioStream(int(a["index"]), str(a.get("codec_name", "")), int(a.get("channels") or 0))
        if a
        else None
    )
    durations = [_float(fmt.get("duration"))] + [_float(s.get("duration")) for s in streams]
    return MediaInfo(
        format_name=str(fmt.get("format_name", "")),
        duration=max(durations),
        video=video,
        audio=audio,
    )


def check_usable(info: MediaInfo, max_duration: float) -> None:
    """Reject what cannot become a talk, with the reason in words."""
    if info.video is None and info.audio is None:
        raise BadMediaError(
            f"source has no audio or video stream (container {info.format_name or 'unknown'})"
        )
    if info.audio is None and info.video is not None and info.video.codec in _IMAGE_CODECS:
        raise BadMediaError(
            f"source is a still image ({info.video.codec}), not a video or audio recording"
        )
    if info.video is not None and (info.video.width <= 0 or info.video.height <= 0):
        raise BadMediaError("source video stream has no picture size; the file may be damaged")
    if info.duration > max_duration:
        raise BadMediaError(
            f"source declares a duration of {info.duration:,.0f} s, over the limit of "
            f"{max_duration:,.0f} s (MAX_DURATION_SECONDS)"
        )
