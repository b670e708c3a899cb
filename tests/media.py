"""Test media generated with FFmpeg: a test pattern with `jfk.wav` as its sound, in many
containers and codecs, plus deliberately broken files. Generated once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
JFK = SHARED / "assets" / "jfk.wav"
WEIGHTLESS_MODEL = SHARED / "assets" / "for-tests-ggml-tiny.bin"
MODELS = SHARED / "models"

_FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


def _video_src(seconds: float, size: str = "320x240", rate: int = 25) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def _speech() -> list[str]:
    return ["-i", str(JFK)]


#: kind -> (file name, ffmpeg arguments after the common prefix, without the output path)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "h264_aac_mp4": ("talk.mp4", [*_video_src(11), *_speech(), "-c:v", "libx264",
                     "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"]),
    "vp9_opus_webm": ("talk.webm", [*_video_src(11), *_speech(), "-c:v", "libvpx-vp9",
                      "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k",
                      "-c:a", "libopus", "-shortest"]),
    "mpeg4_mp3_avi": ("talk.avi", [*_video_src(6), *_speech(), "-c:v", "mpeg4", "-c:a",
                      "libmp3lame", "-shortest"]),
    "h264_mp3_mkv": ("talk.mkv", [*_video_src(6), *_speech(), "-c:v", "libx264", "-preset",
                     "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "libmp3lame", "-shortest"]),
    "h264_10bit_mkv": ("ten-bit.mkv", [*_video_src(4), *_speech(), "-c:v", "libx264", "-preset",
                       "ultrafast", "-pix_fmt", "yuv420p10le", "-c:a", "aac", "-shortest"]),
    "h264_444_mp4": ("four-four-four.mp4", [*_video_src(4), *_speech(), "-c:v", "libx264",
                     "-preset", "ultrafast", "-pix_fmt", "yuv444p", "-c:a", "aac", "-shortest"]),
    "odd_dims_mp4": ("odd.mp4", [*_video_src(4, size="321x241"), *_speech(), "-c:v", "mpeg4",
                     "-c:a", "aac", "-shortest"]),
    "video_only_mp4": ("silent-film.mp4", [*_video_src(8), "-c:v", "libx264", "-preset",
                       "ultrafast", "-pix_fmt", "yuv420p", "-an"]),
    "audio_aac_m4a": ("talk.m4a", [*_speech(), "-c:a", "aac"]),
    "audio_mp3": ("talk.mp3", [*_speech(), "-c:a", "libmp3lame"]),
    "audio_opus_ogg": ("talk.ogg", [*_speech(), "-c:a", "libopus"]),
    "audio_flac": ("talk.flac", [*_speech(), "-c:a", "flac"]),
    "audio_wav": ("talk.wav", [*_speech(), "-c:a", "pcm_s16le"]),
    "audio_mp3_cover": ("cover.mp3", [*_speech(), "-f", "lavfi", "-i",
                        "testsrc2=size=64x64:duration=1", "-frames:v", "1", "-map", "0:a",
                        "-map", "1:v", "-c:a", "libmp3lame", "-c:v", "mjpeg",
                        "-disposition:v", "attached_pic", "-id3v2_version", "3"]),
    "silence_wav": ("silence.wav", ["-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "8",
                    "-c:a", "pcm_s16le"]),
    "image_png": ("picture.png", ["-f", "lavfi", "-i", "testsrc2=size=64x64", "-frames:v", "1"]),
}  # fmt: skip


def make_media(kind: str, directory: Path) -> Path:
    """Generate (or reuse) one kind of test file in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path = directory / "empty.mp4"
        path.write_bytes(b"")
        return path
    if kind == "garbage":
        path = directory / "garbage.mp4"
        path.write_bytes(bytes(range(256)) * 64)
        return path
    if kind == "text":
        path = directory / "notes.mp4"
        path.write_text("These are lecture notes, not a video.\n" * 20)
        return path
    if kind == "truncated_mp4":
        full = make_media("h264_aac_mp4_no_faststart", directory)
        path = directory / "truncated.mp4"
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # moov is at the end: cut it off
        return path
    if kind == "h264_aac_mp4_no_faststart":
        name, args = "nofaststart.mp4", RECIPES["h264_aac_mp4"][1]
    else:
        name, args = RECIPES[kind]
    path = directory / name
    if not path.exists():
        subprocess.run([*_FF, *args, str(path)], check=True, capture_output=True)
    return path


def make_long_talk(directory: Path, seconds: int, size: str, vcodec: str) -> Path:
    """A longer talk for the benchmark: a moving pattern with looped speech."""
    ext, codec = {
        "vp9": (".webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                          "-b:v", "1500k", "-row-mt", "1", "-c:a", "libopus"]),
        "h264": (".mp4", ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                          "-b:v", "1500k", "-c:a", "aac"]),
    }[vcodec]  # fmt: skip
    path = directory / f"talk-{seconds}s-{size}-{vcodec}{ext}"
    if not path.exists():
        subprocess.run(
            [*_FF, *_video_src(seconds, size=size, rate=30), "-stream_loop", "-1", "-i", str(JFK),
             *codec, "-t", str(seconds), str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
    return path
