"""The bad-media corpus (issue 6, item 2) through the real jobrunner process.

`tests/integration/test_jobrunner.py` already covers zero bytes, a truncated MP4 (moov
missing), garbage bytes and a text file with a media extension, a still image, audio-only in
six codecs, video without audio, odd dimensions, 10-bit and 4:4:4 H.264 (re-encoded, not
copied), a hostile file name and paths escaping their folder. This file adds the rest: a
valid container with no audio or video, extreme aspect ratios, variable frame rate, lying
and huge declared durations, surround sound, pure silence and a long silent pause with the
real base model, a file name made of unicode and shell metacharacters, and uploads that are
really HLS playlists or ffconcat lists naming other files (issue 10, defect 6).

Each test asserts the exact outcome — artifacts and rows for a success, the exit class and a
specific message for a failure — and that the scratch directory is left empty.
"""

from __future__ import annotations

import http.server
import itertools
import json
import subprocess
import threading
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from devtools.media import HOSTILE_PLAYLISTS, MODELS, make_hostile_playlist, make_media
from devtools.services import WebDAVServer
from dharma_common.contract import ExitCode
from tests.conftest import Job, Queue
from tests.integration.runner import RunResult, run_jobrunner

pytestmark = pytest.mark.integration

BASE_MODEL = MODELS / "ggml-base.bin"
needs_base_model = pytest.mark.skipif(not BASE_MODEL.exists(), reason="no ggml-base.bin")


def _streams(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_streams", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    streams: list[dict[str, Any]] = json.loads(out.stdout)["streams"]
    return streams


def _stream(path: Path, kind: str) -> dict[str, Any]:
    return next(s for s in _streams(path) if s["codec_type"] == kind)


def _run(queue: Queue, env: dict[str, str], kind: str | Path, **kw: Any) -> tuple[Job, RunResult]:
    job = queue.job(kind, **kw)
    return job, run_jobrunner(env, job.job_id, job.attempt)


def _out(dav: WebDAVServer, job: Job) -> Path:
    return dav.path(f"talks/2510/{job.media_id}")


def _plan(result: RunResult) -> dict[str, Any]:
    return result.event("plan")


def _extinf(out: Path) -> list[float]:
    lines = (out / "hls" / "playlist.m3u8").read_text().splitlines()
    return [float(line[8:].rstrip(",")) for line in lines if line.startswith("#EXTINF:")]


def _duration(queue: Queue, job: Job) -> float:
    value: float = queue.row(
        "SELECT duration_seconds FROM dharma.media_files WHERE id = %s", job.media_id
    )[0]
    return value


def _subtitles(queue: Queue, job: Job) -> list[tuple[int, int, str]]:
    return queue.rows(
        "SELECT start_time_ms, end_time_ms, text FROM dharma.subtitles WHERE media_id = %s"
        " ORDER BY start_time_ms",
        job.media_id,
    )


def _assert_failed_cleanly(queue: Queue, dav: WebDAVServer, scratch: Path, job: Job) -> None:
    assert not _out(dav, job).exists(), "artifacts uploaded for a refused source"
    assert queue.row(
        "SELECT status, result_attempt, progress FROM dharma.stt_jobs WHERE id = %s", job.job_id
    ) == ("processing", None, None)
    assert _duration(queue, job) is None
    assert list(scratch.iterdir()) == [], "scratch files left behind"


def test_container_with_no_audio_or_video_is_refused(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    job, result = _run(queue, runner_env, "no_streams_mkv")
    assert result.code == ExitCode.PERMANENT, result.stderr
    expected = "source has no audio or video stream (container matroska,webm)"
    assert result.message == expected, result.message
    _assert_failed_cleanly(queue, dav, scratch, job)


def test_header_declaring_ten_hours_is_refused_by_the_duration_limit(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    """A 6-second MKV whose header claims 10 hours: the limit applies to what the file
    declares, before any decoding, so a lying header cannot buy hours of encoder time."""
    job, result = _run(queue, runner_env, "huge_duration_mkv")
    assert result.code == ExitCode.PERMANENT, result.stderr
    expected = "declares a duration of 36,000 s, over the limit of 21,600 s (MAX_DURATION_SECONDS)"
    assert result.message == f"source {expected}", result.message
    _assert_failed_cleanly(queue, dav, scratch, job)


@pytest.mark.parametrize(
    ("kind", "real_seconds"), [("lying_duration_mkv", 6.0), ("lying_wav", 11.0)]
)
def test_lying_duration_under_the_limit_records_the_real_duration(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path, kind: str,
    real_seconds: float,
) -> None:  # fmt: skip
    """An MKV header saying 2 hours, a WAV header saying 18.6 hours (FFmpeg clamps the WAV
    to its file size): both are processed, and the duration recorded is the output's."""
    job, result = _run(queue, runner_env, kind)
    assert result.code == 0, result.stderr
    assert _duration(queue, job) == pytest.approx(real_seconds, abs=0.3)
    assert all(end <= real_seconds * 1000 + 300 for _, end, _ in _subtitles(queue, job))
    assert (_out(dav, job) / "audio.m4a").is_file()
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "size"), [("extreme_wide_webm", (2000, 16)), ("extreme_tall_webm", (14, 998))]
)
def test_extreme_aspect_ratios_are_encoded(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path, kind: str,
    size: tuple[int, int],
) -> None:  # fmt: skip
    """2000x16 (125:1) and 15x999 (odd both ways, 1:67): H.264 4:2:0, sizes made even."""
    job, result = _run(queue, runner_env, kind)
    assert result.code == 0, result.stderr
    out = _out(dav, job)
    video = _stream(out / "video.mp4", "video")
    assert (video["codec_name"], video["pix_fmt"]) == ("h264", "yuv420p")
    assert (video["width"], video["height"]) == size
    assert _extinf(out) and (out / "hls" / f"j{job.job_id}-a{job.attempt}-00000.ts").is_file()
    assert list(scratch.iterdir()) == []


def test_variable_frame_rate_is_reencoded_in_sync_with_aligned_segments(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    runner_env["HLS_SHARD_SECONDS"] = "2"
    job, result = _run(queue, runner_env, "vfr_webm")
    assert result.code == 0, result.stderr
    out = _out(dav, job)
    video, audio = _stream(out / "video.mp4", "video"), _stream(out / "video.mp4", "audio")
    assert (video["codec_name"], audio["codec_name"]) == ("h264", "aac")
    assert float(video["duration"]) == pytest.approx(6.0, abs=0.15)
    assert float(video["duration"]) == pytest.approx(float(audio["duration"]), abs=0.15)
    durations = _extinf(out)
    assert len(durations) == 3 and all(abs(d - 2.0) < 0.05 for d in durations[:-1]), durations
    assert list(scratch.iterdir()) == []


def test_variable_frame_rate_h264_is_copied_with_its_timestamps(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    job, result = _run(queue, runner_env, "vfr_h264_mp4")
    assert result.code == 0, result.stderr
    assert _plan(result)["copy_video"] is True
    video = _stream(_out(dav, job) / "video.mp4", "video")
    # Stream copy keeps the irregular timing: the average rate is below the nominal 25/1.
    assert video["avg_frame_rate"] == "52/3" and video["r_frame_rate"] == "25/1"
    assert _duration(queue, job) == pytest.approx(6.0, abs=0.2)
    assert list(scratch.iterdir()) == []


def test_surround_audio_is_downmixed_to_stereo(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    job, result = _run(queue, runner_env, "audio_51_flac")
    assert result.code == 0, result.stderr
    audio = _stream(_out(dav, job) / "audio.m4a", "audio")
    assert (audio["codec_name"], audio["channels"]) == ("aac", 2)
    assert list(scratch.iterdir()) == []


@needs_base_model
def test_silent_audio_track_gives_no_subtitles_even_in_chinese(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    """A screen recording with a muted microphone, transcribed in the default language
    (zh). Before the silence gate the base model wrote one invented line and then another
    nine times (collapsed to two), and in English a "[BLANK_AUDIO]" caption."""
    runner_env["WHISPER_MODEL"] = str(BASE_MODEL)
    runner_env["WHISPER_LANGUAGE"] = "zh"
    job, result = _run(queue, runner_env, "silent_audio_mp4")
    assert result.code == 0, result.stderr
    assert result.events("audio_silent"), result.stderr
    assert _subtitles(queue, job) == []
    out = _out(dav, job)
    assert (out / "subtitles.vtt").read_text() == "WEBVTT\n\n"
    assert _stream(out / "audio.m4a", "audio")["codec_name"] == "aac"
    assert _duration(queue, job) == pytest.approx(12.0, abs=0.2)
    assert list(scratch.iterdir()) == []


@needs_base_model
def test_long_silent_pause_has_no_captions_and_keeps_a_repeated_sentence(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    """Speech, 30 s of silence, the same speech again: nothing is captioned inside the
    pause, and the sentence said twice stays two captions (repeats are only collapsed when
    they are back to back, as whisper's loops on silence are)."""
    runner_env["WHISPER_MODEL"] = str(BASE_MODEL)
    job, result = _run(queue, runner_env, "speech_gap_m4a", language="en")
    assert result.code == 0, result.stderr
    rows = _subtitles(queue, job)
    said = [r for r in rows if "your country" in r[2].lower()]
    assert len(said) == 2, rows
    assert said[0][0] < 11_000 and said[1][1] > 41_000
    silent = (11_500, 40_500)
    assert not [r for r in rows if r[0] >= silent[0] and r[1] <= silent[1]], rows
    assert all(a[2] != b[2] or b[0] - a[1] > 1000 for a, b in itertools.pairwise(rows)), rows
    assert "[BLANK_AUDIO]" not in (_out(dav, job) / "subtitles.vtt").read_text()
    assert list(scratch.iterdir()) == []


#: Unicode in three scripts, NFD accents, an emoji with a joiner, right-to-left text, and
#: shell metacharacters; percent signs that look like an escaped "../"; no plain extension.
#: (A backslash or control character is refused with its own message: test_runner_units.)
HOSTILE_NAME = (
    "讲座 Vortrag Gespr" + unicodedata.normalize("NFD", "ä") + "ch 🧘🏽‍♀️ درس"
    " `id` $(touch pwned) ${HOME} | & ; < > * ? ! ~ # % %2e%2e%2f 'q' \"qq\" talk.mp4;x"
)


def test_unicode_and_shell_metacharacters_in_the_file_name(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    source_path = f"/uploads/-{HOSTILE_NAME}"
    dav.faults.clear()
    job, result = _run(queue, runner_env, "vp9_opus_webm", source_path=source_path)
    assert result.code == 0, result.stderr
    gets = [r.path for r in dav.faults.log if r.method == "GET"]
    # WSGI hands the server the percent-decoded path as latin-1: one GET, byte for byte.
    assert [p.encode("latin-1").decode("utf-8") for p in gets] == [source_path]
    out = _out(dav, job)
    assert {p.name for p in out.iterdir()} == {"video.mp4", "audio.m4a", "subtitles.vtt", "hls"}
    assert _stream(out / "video.mp4", "video")["codec_name"] == "h264"
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()
    assert list(scratch.iterdir()) == []


class _RecordingHTTP(http.server.ThreadingHTTPServer):
    """A real HTTP server on loopback that serves one media file and counts requests: the
    proof that FFmpeg never followed a playlist to the network."""

    def __init__(self, body: bytes) -> None:
        self.body, self.requests = body, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(inner) -> None:  # noqa: N805 - `self` is the server's
                self.requests += 1
                inner.send_response(200)
                inner.send_header("Content-Type", "video/mp2t")
                inner.send_header("Content-Length", str(len(self.body)))
                inner.end_headers()
                inner.wfile.write(self.body)

            def log_message(inner, *args: Any) -> None:  # noqa: N805
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@pytest.mark.parametrize("kind", list(HOSTILE_PLAYLISTS))
def test_playlists_naming_other_files_are_refused_and_read_nothing(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path,
    tmp_path: Path, kind: str,
) -> None:  # fmt: skip
    """An upload that is really an HLS playlist or an ffconcat list, naming a real talk on
    the runner's disk (absolute, relative, through a nested playlist) or on a loopback HTTP
    server. Without the demuxer allow-list FFmpeg opened the named file and the job
    completed with that file's picture and sound. Now each is refused as permanent bad
    media, before FFmpeg opens anything: nothing is published, and the HTTP server sees no
    request."""
    real = make_media("h264_aac_ts", tmp_path / "elsewhere")
    server = _RecordingHTTP(real.read_bytes())
    try:
        target = server.url("talk.ts") if "http" in kind else str(real)
        hostile = make_hostile_playlist(kind, tmp_path / "uploads", target, scratch)
        job, result = _run(queue, runner_env, hostile)
    finally:
        server.shutdown()
        server.server_close()
    assert result.code == ExitCode.PERMANENT, result.stderr
    demuxer = "concat" if kind.startswith("ffconcat") else "hls"
    assert result.message == (
        f"source is a {demuxer} file, which names other files or URLs, not a media "
        "recording; it was not opened"
    ), result.message
    assert server.requests == 0, "FFmpeg fetched the URL named in the playlist"
    _assert_failed_cleanly(queue, dav, scratch, job)
