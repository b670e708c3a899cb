"""Which FFmpeg commands turn a probed source into the artifacts — a pure function, so the
encode-at-most-once rules can be read and unit-tested without running FFmpeg.

The rules (DESIGN.md defect 4): the video is encoded at most once, and not at all when it is
already H.264 4:2:0 8-bit; AAC audio is copied; HLS and M4A are always made by stream copy
from the encoded MP4 (or M4A), with keyframes forced on `HLS_SHARD_SECONDS` boundaries when
we encode, so segments are cut exactly there. Whisper gets 16 kHz mono PCM from its own
audio-only pass, which is fast and lets transcription start while the video encodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from jobrunner.probe import SOURCE_INPUT_OPTIONS, MediaInfo

#: Pixel formats a browser's H.264 decoder plays (8-bit 4:2:0); anything else is re-encoded.
_COPYABLE_PIX_FMTS = {"yuv420p", "yuvj420p"}
_FFMPEG = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


@dataclass(frozen=True)
class EncodeOptions:
    bitrate: str = "2000k"
    shard_seconds: int = 6
    audio_bitrate: str = "128k"
    preset: str = "veryfast"
    #: x264 threads; 0 lets x264 choose (all cores).
    threads: int = 0


def run_name(job_id: int, attempt: int) -> str:
    """The name of one attempt's HLS segments, `j<job>-a<attempt>-00000.ts` (issue 10, defect
    11). (job id, attempt) is unique for ever (attempts only rises, even on a re-queue), so
    no two runs of a media — attempts of one job, or two jobs — write the same segment name:
    a late PUT from a dying stale attempt cannot overwrite a segment the current playlist
    refers to, and the current run can tell an earlier run's segments from its own."""
    return f"j{job_id}-a{attempt}"


@dataclass(frozen=True)
class Workspace:
    """Fixed local file names under a private scratch directory (never derived from data).
    `run` (see `run_name`) prefixes the HLS segment names."""

    root: Path
    source_ext: str = ""
    run: str = "segment"

    @property
    def source(self) -> Path:
        return self.root / f"source{self.source_ext}"

    @property
    def pcm(self) -> Path:
        return self.root / "audio.pcm"

    @property
    def video(self) -> Path:
        return self.root / "video.mp4"

    @property
    def audio(self) -> Path:
        return self.root / "audio.m4a"

    @property
    def hls(self) -> Path:
        return self.root / "hls"

    @property
    def playlist(self) -> Path:
        return self.hls / "playlist.m3u8"

    @property
    def segment_pattern(self) -> Path:
        """FFmpeg's `-hls_segment_filename`: `hls/<run>-00000.ts`, ..."""
        return self.hls / f"{self.run}-%05d.ts"

    @property
    def vtt(self) -> Path:
        return self.root / "subtitles.vtt"


@dataclass(frozen=True)
class Plan:
    """The commands of one attempt, in the order they run (see module docstring)."""

    pcm: list[str] | None
    main: list[str]
    package: list[str]
    copy_video: bool | None
    copy_audio: bool | None
    outputs: list[Path] = field(default_factory=list)


def bits_per_second(rate: str) -> int:
    """'2000k' -> 2000000 (FFmpeg's own notation)."""
    match = re.fullmatch(r"([1-9][0-9]*)([kKmM]?)", rate)
    if not match:
        raise ValueError(f"not a bitrate: {rate!r}")
    scale = {"": 1, "k": 1000, "m": 1_000_000}[match[2].lower()]
    return int(match[1]) * scale


def can_copy_video(info: MediaInfo) -> bool:
    return (
        info.video is not None
        and info.video.codec == "h264"
        and (info.video.pix_fmt in _COPYABLE_PIX_FMTS)
    )


def can_copy_audio(info: MediaInfo) -> bool:
    return info.audio is not None and info.audio.codec == "aac"


def _audio_args(info: MediaInfo, opts: EncodeOptions) -> list[str]:
    assert info.audio is not None
    if can_copy_audio(info):
        return ["-c:a", "copy"]
    args = ["-c:a", "aac", "-b:a", opts.audio_bitrate]
    if info.audio.channels > 2:
        args += ["-ac", "2"]  # downmix surround for the web player
    return args


def _video_args(info: MediaInfo, opts: EncodeOptions) -> list[str]:
    assert info.video is not None
    if can_copy_video(info):
        return ["-c:v", "copy"]
    rate = bits_per_second(opts.bitrate)
    args = [
        "-c:v", "libx264", "-preset", opts.preset, "-profile:v", "high", "-pix_fmt", "yuv420p",
        "-b:v", str(rate), "-maxrate", str(rate * 3 // 2), "-bufsize", str(rate * 2),
        # A keyframe on every shard boundary and none elsewhere: HLS cuts exactly there.
        "-force_key_frames", f"expr:gte(t,n_forced*{opts.shard_seconds})", "-sc_threshold", "0",
    ]  # fmt: skip
    if opts.threads:
        args += ["-threads", str(opts.threads)]
    if info.video.width % 2 or info.video.height % 2:
        args += ["-vf", "scale=trunc(iw/2)*2:trunc(ih/2)*2"]  # 4:2:0 needs even sizes
    return args


def _hls_args(ws: Workspace, opts: EncodeOptions) -> list[str]:
    return [
        "-f", "hls", "-hls_time", str(opts.shard_seconds), "-hls_playlist_type", "vod",
        "-hls_list_size", "0", "-hls_segment_filename", str(ws.segment_pattern),
        str(ws.playlist),
    ]  # fmt: skip


def make_plan(info: MediaInfo, ws: Workspace, opts: EncodeOptions) -> Plan:
    """Build the commands for one source. `check_usable` has already run."""
    src = [*SOURCE_INPUT_OPTIONS, "-i", str(ws.source)]  # the same demuxers ffprobe accepted
    pcm = None
    if info.audio is not None:
        pcm = [
            *_FFMPEG, *src, "-map", f"0:{info.audio.index}", "-vn", "-sn", "-dn",
            "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", "-f", "s16le", str(ws.pcm),
        ]  # fmt: skip
    if info.video is not None:
        maps = ["-map", f"0:{info.video.index}"]
        codec = _video_args(info, opts)
        if info.audio is not None:
            maps += ["-map", f"0:{info.audio.index}"]
            codec += _audio_args(info, opts)
        main = [
            *_FFMPEG, *src, *maps, *codec, "-sn", "-dn", "-map_chapters", "-1",
            "-movflags", "+faststart", "-f", "mp4", str(ws.video),
        ]  # fmt: skip
        package = [*_FFMPEG, "-i", str(ws.video), "-map", "0", "-c", "copy", *_hls_args(ws, opts)]
        outputs = [ws.video, ws.playlist]
        if info.audio is not None:
            package += ["-map", "0:a", "-c", "copy", "-movflags", "+faststart", "-f", "mp4",
                        str(ws.audio)]  # fmt: skip
            outputs.append(ws.audio)
        return Plan(pcm, main, package, can_copy_video(info),
                    can_copy_audio(info) if info.audio else None, outputs)  # fmt: skip
    assert info.audio is not None
    main = [
        *_FFMPEG, *src, "-map", f"0:{info.audio.index}", "-vn", "-sn", "-dn",
        *_audio_args(info, opts), "-map_chapters", "-1", "-movflags", "+faststart",
        "-f", "mp4", str(ws.audio),
    ]  # fmt: skip
    package = [*_FFMPEG, "-i", str(ws.audio), "-map", "0:a", "-c", "copy", *_hls_args(ws, opts)]
    return Plan(pcm, main, package, None, can_copy_audio(info), [ws.audio, ws.playlist])


def playlist_segments(text: str) -> list[str]:
    """The media URIs of an HLS playlist (RFC 8216 4.1: every line that is neither blank nor
    a tag or comment starting with `#`), in playlist order."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def stale_segments(listing: list[str], referenced: list[str]) -> list[str]:
    """Which names in the WebDAV hls collection to delete after a playlist referring to
    `referenced` went up: every HLS segment (`*.ts`, this or an earlier naming) the playlist
    does not refer to — an earlier run's, or a stale attempt's late upload. Anything else
    (the playlist, files this runner never writes) is left alone."""
    keep = set(referenced)
    return sorted(name for name in listing if name.endswith(".ts") and name not in keep)
