"""Test media generated with FFmpeg: a test pattern with `jfk.wav` as its sound, in many
containers and codecs, plus deliberately broken files. Generated once per session.

The bad-media corpus (issue 6) is every kind below; `tests/integration/test_jobrunner.py`
and `tests/integration/test_bad_media.py` run each one through the real jobrunner.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from devtools.cache import CACHE

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
JFK = SHARED / "assets" / "jfk.wav"
WEIGHTLESS_MODEL = SHARED / "assets" / "for-tests-ggml-tiny.bin"
MODELS = SHARED / "models"
#: The real English tiny model of shared/models, and its SHA-256 (shared/models/README.md).
TINY_EN = MODELS / "ggml-tiny.en.bin"
TINY_EN_SHA256 = "49b35c0f0fa5e8fe48396546d4c3308e7cc3e8a50589273a99710c76fd373fdf"

_FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]

#: Where generated media that take long to make (hour-long talks) are kept between runs.
MEDIA_CACHE = CACHE / "media"


def _ffmpeg_to(path: Path, args: list[str]) -> Path:
    """Run FFmpeg with `args` writing `path`, through a temporary name renamed at the end:
    the generators reuse an existing file, so a run that fails or is killed half-way must
    not leave one behind under the final name (and two processes making the same file at
    once each write their own)."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        subprocess.run([*_FF, *args, str(partial)], check=True, capture_output=True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _video_src(seconds: float, size: str = "320x240", rate: int = 25) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}:duration={seconds}"]


def _speech() -> list[str]:
    return ["-i", str(JFK)]


#: Keep frames 0-2, then drop every 5th+2 and 7th+3 frame: irregular gaps between frames.
_VFR_SELECT = "select='lt(n\\,3)+not(eq(mod(n\\,5)\\,2))*not(eq(mod(n\\,7)\\,3))'"

#: kind -> (file name, ffmpeg arguments after the common prefix, without the output path)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "h264_aac_mp4": ("talk.mp4", [*_video_src(11), *_speech(), "-c:v", "libx264",
                     "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"]),
    # An MPEG-TS talk: what an HLS playlist names, so a hostile playlist can point at it.
    "h264_aac_ts": ("talk.ts", [*_video_src(11), *_speech(), "-c:v", "libx264",
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
    # testsrc2 rounds its size down to even numbers: scale afterwards to get really odd ones.
    "odd_dims_mp4": ("odd.mp4", [*_video_src(4), *_speech(), "-vf", "scale=321:241",
                     "-c:v", "mpeg4", "-c:a", "aac", "-shortest"]),
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
    # A banner 125:1 wide and a sliver 1:67 tall with odd sizes: x264 and 4:2:0 must cope.
    "extreme_wide_webm": ("banner.webm", [*_video_src(4, size="2000x16"), *_speech(),
                          "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                          "-b:v", "200k", "-c:a", "libopus", "-shortest"]),
    "extreme_tall_webm": ("sliver.webm", [*_video_src(4, size="16x1000"), *_speech(),
                          "-vf", "scale=15:999",
                          "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                          "-c:a", "libopus", "-shortest"]),
    # Variable frame rate: frames dropped irregularly, the timestamps kept (`-fps_mode vfr`).
    "vfr_webm": ("vfr.webm", [*_video_src(6), *_speech(), "-vf", _VFR_SELECT, "-fps_mode",
                 "vfr", "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                 "-b:v", "300k", "-c:a", "libopus", "-shortest"]),
    "vfr_h264_mp4": ("vfr.mp4", [*_video_src(6), *_speech(), "-vf", _VFR_SELECT, "-fps_mode",
                     "vfr", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                     "-c:a", "aac", "-shortest"]),
    # A screen recording with a muted microphone: a real, silent AAC track.
    "silent_audio_mp4": ("muted.mp4", [*_video_src(12), "-f", "lavfi", "-i",
                         "anullsrc=r=44100:cl=stereo", "-c:v", "libx264", "-preset",
                         "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest"]),
    # Speech, 30 s of silence (a meditation), speech again.
    "speech_gap_m4a": ("meditation.m4a", [*_speech(), "-f", "lavfi", "-i",
                       "anullsrc=r=16000:cl=mono:d=30", *_speech(), "-filter_complex",
                       "[0:a][1:a][2:a]concat=n=3:v=0:a=1", "-c:a", "aac"]),
    # Surround sound must be downmixed for the web player.
    "audio_51_flac": ("surround.flac", [*_speech(), "-af",
                      "pan=5.1|FL=c0|FR=c0|FC=c0|LFE=c0|BL=c0|BR=c0", "-c:a", "flac"]),
}  # fmt: skip


def _patched(source: Path, path: Path, patch: tuple[bytes, int, bytes]) -> Path:
    """Copy `source` to `path` with the bytes after the first `marker` replaced: a file whose
    header lies, which FFmpeg can only make by accident."""
    marker, skip, value = patch
    data = bytearray(source.read_bytes())
    at = data.find(marker)
    if at < 0:
        raise RuntimeError(f"{marker!r} not found in {source}")
    at += len(marker) + skip
    data[at : at + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated_mp4(directory: Path) -> Path:
    full = make_media("h264_aac_mp4_no_faststart", directory)
    data = full.read_bytes()
    return _write(directory / "truncated.mp4", data[: len(data) // 2])  # moov is at the end


def _no_streams_mkv(directory: Path) -> Path:
    """A valid Matroska file whose only stream is a subtitle track: no sound, no picture."""
    path = directory / "subtitles-only.mkv"
    srt = directory / "subtitles-only.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:05,000\nA caption with nothing to caption\n")
    subprocess.run([*_FF, "-i", str(srt), "-c:s", "srt", str(path)], check=True,
                   capture_output=True)  # fmt: skip
    return path


#: The kinds that are not an FFmpeg recipe (RECIPES): hand-made, or a recipe's output patched.
#: Matroska's Segment Duration element is ID 0x4489, an 8-byte float in milliseconds.
_SPECIAL: dict[str, Callable[[Path], Path]] = {
    "empty": lambda d: _write(d / "empty.mp4", b""),
    "garbage": lambda d: _write(d / "garbage.mp4", bytes(range(256)) * 64),
    "text": lambda d: _write(d / "notes.mp4", b"These are lecture notes, not a video.\n" * 20),
    "truncated_mp4": _truncated_mp4,
    "no_streams_mkv": _no_streams_mkv,
    # A 6-second MKV whose Segment Duration says 10 hours.
    "huge_duration_mkv": lambda d: _patched(
        make_media("h264_mp3_mkv", d),
        d / "ten-hours.mkv",
        (b"\x44\x89\x88", 0, struct.pack(">d", 36_000_000.0)),
    ),
    # The same lie, but under the limit (2 hours): the real duration must be recorded.
    "lying_duration_mkv": lambda d: _patched(
        make_media("h264_mp3_mkv", d),
        d / "two-hours.mkv",
        (b"\x44\x89\x88", 0, struct.pack(">d", 7_200_000.0)),
    ),
    # A WAV whose data chunk claims 2 GiB (18.6 hours of 16 kHz mono) but holds 11 s.
    "lying_wav": lambda d: _patched(
        make_media("audio_wav", d), d / "liar.wav", (b"data", 0, struct.pack("<I", 0x7FFFFFF0))
    ),
}


def make_media(kind: str, directory: Path) -> Path:
    """Generate (or reuse) one kind of test file in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind in _SPECIAL:
        return _SPECIAL[kind](directory)
    if kind == "h264_aac_mp4_no_faststart":
        name, args = "nofaststart.mp4", RECIPES["h264_aac_mp4"][1]
    else:
        name, args = RECIPES[kind]
    path = directory / name
    return path if path.exists() else _ffmpeg_to(path, args)


def make_long_talk(directory: Path, seconds: int, size: str, vcodec: str) -> Path:
    """A longer talk for the benchmark: a moving pattern with looped speech."""
    ext, codec = {
        "vp9": (".webm", ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8",
                          "-b:v", "1500k", "-row-mt", "1", "-c:a", "libopus"]),
        "h264": (".mp4", ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
                          "-b:v", "1500k", "-c:a", "aac"]),
    }[vcodec]  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"talk-{seconds}s-{size}-{vcodec}{ext}"
    if not path.exists():
        _ffmpeg_to(path, [*_video_src(seconds, size=size, rate=30), "-stream_loop", "-1",
                          "-i", str(JFK), *codec, "-t", str(seconds)])  # fmt: skip
    return path


def make_spoken_talk(directory: Path, seconds: int, period: float = 12.5) -> Path:
    """An audio-only talk (MP3, 48 kHz stereo 128 kb/s, as recorders write them) of
    `seconds`: the speech sample (11 s) then silence, every `period` seconds. The default
    is dense speech with a pause after each sentence; a long period makes a sparse talk
    (mostly silence, which whisper is never given)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"spoken-{seconds}s-every-{period:g}s.mp3"
    if path.exists():
        return path
    unit = _ffmpeg_to(
        directory / f"unit-{period:g}s.wav",
        [*_speech(), "-af", "apad", "-t", f"{period:g}", "-ar", "48000", "-ac", "2"],
    )
    try:
        return _ffmpeg_to(path, ["-stream_loop", "-1", "-i", str(unit), "-t", str(seconds),
                                 "-c:a", "libmp3lame", "-b:a", "128k"])  # fmt: skip
    finally:
        unit.unlink()


#: Mandarin sentences spoken by espeak-ng, in Simplified script. Chosen so that many of
#: their characters differ between Simplified and Traditional (学/學, 这/這, 经/經): a
#: transcript's script shows in them. The voice matters: Debian's `cmn` voice turns
#: characters into pinyin and then reads the pinyin as English ("jin wan"), which whisper
#: cannot understand; `cmn-latn-pinyin` reads the same pinyin as Mandarin.
MANDARIN_SENTENCES = (
    "今天我们学习佛经。",
    "这个问题很重要，请大家认真听讲。",
    "我们应该怎样对待自己的烦恼呢？",
    "学习佛法需要耐心和恒心。",
)


def make_mandarin_speech(directory: Path, sentences: tuple[str, ...] = MANDARIN_SENTENCES) -> Path:
    """A WAV (16 kHz mono) of `sentences` spoken in Mandarin by espeak-ng, each followed by
    0.6 s of silence. Needs Debian's `espeak-ng` (scripts/bootstrap installs it)."""
    import hashlib

    key = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]
    path = directory / f"mandarin-{key}.wav"
    if path.exists():
        return path
    return espeak(path, "cmn-latn-pinyin", sentences)


def espeak(path: Path, voice: str, sentences: tuple[str, ...], speed: int = 150) -> Path:
    """`sentences` spoken by espeak-ng's `voice` into `path` (16 kHz mono WAV), 0.6 s of
    silence after each (a pause the runner's windows may cut at)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    parts = []
    for number, sentence in enumerate(sentences):
        raw = path.with_name(f"{path.stem}-{number}.wav")
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), sentence],
            check=True, capture_output=True,
        )  # fmt: skip
        parts.append(raw)
    inputs = [arg for part in parts for arg in ("-i", str(part))]
    chain = "".join(f"[{n}:a]aresample=16000,apad=pad_dur=0.6[a{n}];" for n in range(len(parts)))
    chain += "".join(f"[a{n}]" for n in range(len(parts)))
    chain += f"concat=n={len(parts)}:v=0:a=1[out]"
    subprocess.run(
        [*_FF, *inputs, "-filter_complex", chain, "-map", "[out]", "-ar", "16000", "-ac", "1",
         "-c:a", "pcm_s16le", str(path)],
        check=True, capture_output=True,
    )  # fmt: skip
    for part in parts:
        part.unlink()
    return path


#: Hostile "media" (issue 10, defect 6): text files FFmpeg would open as a playlist or a
#: concat list and then read the files they name. Each gets a media extension, as an upload
#: would. kind -> file name.
HOSTILE_PLAYLISTS = {
    "hls_absolute": "absolute.mp4",
    "hls_relative": "relative.mp4",
    "hls_nested": "nested.mp4",
    "ffconcat_relative": "concat.mkv",
    "hls_http_loopback": "remote.webm",
}


def _hls(entry: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:12\n#EXTINF:11.0,\n{entry}\n#EXT-X-ENDLIST\n"


def make_hostile_playlist(kind: str, directory: Path, target: str, scratch: Path) -> Path:
    """A playlist of `kind` naming `target`: an absolute path, an http URL, or (for the
    relative kinds) a path made relative to `scratch`, where the runner stores its
    download — so each really points at the file FFmpeg would read without the fix."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / HOSTILE_PLAYLISTS[kind]
    relative = os.path.relpath(target, scratch / "job") if target.startswith("/") else target
    if kind == "hls_nested":
        inner = directory / "inner.m3u8"
        inner.write_text(_hls(target))
        text = f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000\n{inner}\n"
    elif kind == "ffconcat_relative":
        text = f"ffconcat version 1.0\nfile '{relative}'\n"
    elif kind == "hls_relative":
        text = _hls(relative)
    else:
        text = _hls(target)
    path.write_text(text)
    return path
