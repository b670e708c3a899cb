"""The real jobrunner process against real PostgreSQL, WsgiDAV, FFmpeg and whisper.cpp.

Each test enqueues a generated media file, claims it as the controller would, runs
`python -m jobrunner run` and checks the artifacts on WebDAV at the contract paths, the rows
in the database, the exit code and termination message, and that no scratch file is left.
Whisper runs with the weightless test model (its words are meaningless, never asserted);
`test_real_model_*` uses a real model from ../shared/models when present.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devtools.log_actions import read_until_action
from devtools.media import MODELS
from devtools.services import WebDAVServer
from dharma_common.contract import ExitCode
from tests.conftest import Job, Queue
from tests.integration.runner import RunResult, run_jobrunner, start_jobrunner

pytestmark = pytest.mark.integration


def _probe(path: Path) -> dict[str, object]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
         str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    data: dict[str, object] = json.loads(out.stdout)
    return data


def _codecs(path: Path) -> dict[str, str]:
    streams = _probe(path)["streams"]
    assert isinstance(streams, list)
    return {s["codec_type"]: s["codec_name"] for s in streams}


def _top_level_atoms(path: Path) -> list[str]:
    atoms = []
    with path.open("rb") as f:
        while header := f.read(8):
            size = int.from_bytes(header[:4], "big")
            atoms.append(header[4:8].decode("latin-1"))
            if size == 1:
                size = int.from_bytes(f.read(8), "big") - 8
            f.seek(size - 8, os.SEEK_CUR)
    return atoms


def _artifacts(dav: WebDAVServer, job: Job) -> Path:
    return dav.path(f"talks/2510/{job.media_id}")


def _run(
    queue: Queue, env: dict[str, str], kind: str | Path, **kw: object
) -> tuple[Job, RunResult]:
    job = queue.job(kind, **kw)  # type: ignore[arg-type]
    return job, run_jobrunner(env, job.job_id, job.attempt)


def _assert_clean_scratch(scratch: Path) -> None:
    assert list(scratch.iterdir()) == [], "scratch files left behind"


def _playlist_segments(playlist: Path) -> list[str]:
    return [line for line in playlist.read_text().splitlines() if line and not line.startswith("#")]


def test_h264_aac_is_stream_copied(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    job, result = _run(queue, runner_env, "h264_aac_mp4")
    assert result.code == 0, result.stderr
    out = _artifacts(dav, job)
    assert _codecs(out / "video.mp4") == {"video": "h264", "audio": "aac"}
    assert _codecs(out / "audio.m4a") == {"audio": "aac"}
    atoms = _top_level_atoms(out / "video.mp4")
    assert atoms.index("moov") < atoms.index("mdat"), "MP4 is not +faststart"
    segments = _playlist_segments(out / "hls" / "playlist.m3u8")
    assert segments and all((out / "hls" / s).is_file() for s in segments)
    assert (out / "subtitles.vtt").read_text().startswith("WEBVTT")
    plan = result.event("plan")
    assert plan["copy_video"] is True and plan["copy_audio"] is True
    for line in result.stderr.splitlines():  # every log line is JSON with the job identity
        record = json.loads(line)
        assert record["job_id"] == job.job_id and record["attempt"] == job.attempt
    status, progress, result_attempt, duration = queue.row(
        "SELECT j.status, j.progress, j.result_attempt, m.duration_seconds FROM dharma.stt_jobs j"
        " JOIN dharma.media_files m ON m.id = j.media_id WHERE j.id = %s",
        job.job_id,
    )
    # The runner never sets the final status: that is the controller's job.
    assert (status, progress, result_attempt) == ("processing", 1.0, job.attempt)
    assert duration == pytest.approx(11.0, abs=0.2)
    _assert_clean_scratch(scratch)


def test_vp9_opus_is_encoded_once_with_shard_aligned_keyframes(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    runner_env["HLS_SHARD_SECONDS"] = "2"
    runner_env["HLS_BITRATE"] = "300k"
    job, result = _run(queue, runner_env, "vp9_opus_webm")
    assert result.code == 0, result.stderr
    out = _artifacts(dav, job)
    assert _codecs(out / "video.mp4") == {"video": "h264", "audio": "aac"}
    playlist = (out / "hls" / "playlist.m3u8").read_text()
    durations = [float(line[8:].rstrip(",")) for line in playlist.splitlines()
                 if line.startswith("#EXTINF:")]  # fmt: skip
    assert len(durations) >= 5
    assert all(abs(d - 2.0) < 0.05 for d in durations[:-1]), durations
    video = next(s for s in _probe(out / "video.mp4")["streams"] if s["codec_type"] == "video")  # type: ignore[attr-defined]
    assert int(video["bit_rate"]) <= 300_000 * 1.5 * 1.1  # HLS_BITRATE honoured (maxrate 1.5x)
    _assert_clean_scratch(scratch)


@pytest.mark.parametrize(
    "kind", ["h264_10bit_mkv", "h264_444_mp4", "odd_dims_mp4", "mpeg4_mp3_avi"]
)
def test_sources_browsers_cannot_play_are_reencoded(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, kind: str
) -> None:
    job, result = _run(queue, runner_env, kind)
    assert result.code == 0, result.stderr
    video = next(
        s
        for s in _probe(_artifacts(dav, job) / "video.mp4")["streams"]  # type: ignore[attr-defined]
        if s["codec_type"] == "video"
    )
    assert video["codec_name"] == "h264" and video["pix_fmt"] == "yuv420p"
    assert video["width"] % 2 == 0 and video["height"] % 2 == 0


def test_h264_with_mp3_copies_video_and_encodes_audio(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    job, result = _run(queue, runner_env, "h264_mp3_mkv")
    assert result.code == 0, result.stderr
    plan = result.event("plan")
    assert plan["copy_video"] is True and plan["copy_audio"] is False
    assert _codecs(_artifacts(dav, job) / "video.mp4") == {"video": "h264", "audio": "aac"}


@pytest.mark.parametrize(
    "kind", ["audio_aac_m4a", "audio_mp3", "audio_opus_ogg", "audio_flac", "audio_wav",
             "audio_mp3_cover"],
)  # fmt: skip
def test_audio_only_gives_m4a_and_audio_hls_without_mp4(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path, kind: str
) -> None:
    job, result = _run(queue, runner_env, kind)
    assert result.code == 0, result.stderr
    out = _artifacts(dav, job)
    assert not (out / "video.mp4").exists()
    assert _codecs(out / "audio.m4a") == {"audio": "aac"}
    segments = _playlist_segments(out / "hls" / "playlist.m3u8")
    assert segments and _codecs(out / "hls" / segments[0]) == {"audio": "aac"}
    assert (out / "subtitles.vtt").exists()
    duration = queue.row("SELECT duration_seconds FROM dharma.media_files WHERE id = %s",
                         job.media_id)[0]  # fmt: skip
    assert duration == pytest.approx(11.0, abs=0.3)
    _assert_clean_scratch(scratch)


def test_video_without_audio_has_no_subtitles(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    media_id = queue.add_media("video_only_mp4")
    with queue.conn.cursor() as cur:  # leftovers from an earlier version of this media
        cur.execute(
            "INSERT INTO dharma.subtitles (media_id, start_time_ms, end_time_ms, text)"
            " VALUES (%s, 0, 1000, 'stale')", (media_id,),
        )  # fmt: skip
    job_id = queue.enqueue(media_id)
    attempt = queue.claim(job_id)
    result = run_jobrunner(runner_env, job_id, attempt)
    assert result.code == 0, result.stderr
    out = dav.path(f"talks/2510/{media_id}")
    assert _codecs(out / "video.mp4") == {"video": "h264"}
    assert not (out / "audio.m4a").exists()
    assert (out / "hls" / "playlist.m3u8").exists()
    assert (out / "subtitles.vtt").read_text() == "WEBVTT\n\n"
    count = queue.row("SELECT count(*) FROM dharma.subtitles WHERE media_id = %s", media_id)[0]
    assert count == 0
    assert "transcribe" not in result.stderr


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("empty", "is empty (0 bytes)"),
        ("garbage", "not readable media: ffprobe:"),
        ("text", "not readable media: ffprobe:"),
        ("truncated_mp4", "moov atom not found"),
        ("image_png", "still image"),
    ],
)
def test_bad_media_fails_permanently_with_ffmpegs_reason(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path,
    kind: str, expected: str,
) -> None:  # fmt: skip
    job, result = _run(queue, runner_env, kind)
    assert result.code == ExitCode.PERMANENT, result.stderr
    assert expected in result.message
    assert "\n" not in result.message
    assert not _artifacts(dav, job).exists()
    assert queue.row("SELECT status, result_attempt FROM dharma.stt_jobs WHERE id = %s",
                     job.job_id) == ("processing", None)  # fmt: skip
    _assert_clean_scratch(scratch)


def test_limits_on_size_and_duration(
    queue: Queue, runner_env: dict[str, str], scratch: Path
) -> None:
    runner_env["MAX_SOURCE_BYTES"] = "1000"
    _, result = _run(queue, runner_env, "h264_aac_mp4")
    assert result.code == ExitCode.PERMANENT and "MAX_SOURCE_BYTES" in result.message
    runner_env["MAX_SOURCE_BYTES"] = str(10**9)
    runner_env["MAX_DURATION_SECONDS"] = "5"
    _, result = _run(queue, runner_env, "h264_aac_mp4")
    assert result.code == ExitCode.PERMANENT and "MAX_DURATION_SECONDS" in result.message
    _assert_clean_scratch(scratch)


def test_hostile_file_name_is_handled(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    name = "/uploads/-rf $(touch pwned) 'talk' \"2025\" #1; 讲座.mp4"
    job, result = _run(queue, runner_env, "h264_aac_mp4", source_path=name)
    assert result.code == 0, result.stderr
    assert (_artifacts(dav, job) / "video.mp4").is_file()
    assert not Path("pwned").exists()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("source_path", "/uploads/../../etc/passwd", "not a clean path"),
        ("category", "../../escape", "category_id"),
    ],
)
def test_paths_escaping_their_folder_are_refused_before_any_request(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, field: str, value: str,
    expected: str,
) -> None:  # fmt: skip
    media_id = queue.add_media("h264_aac_mp4")
    column = "source_path" if field == "source_path" else "category_id"
    with queue.conn.cursor() as cur:
        cur.execute(f"UPDATE dharma.media_files SET {column} = %s WHERE id = %s", (value, media_id))
    job_id = queue.enqueue(media_id)
    dav.faults.clear()
    result = run_jobrunner(runner_env, job_id, queue.claim(job_id))
    assert result.code == ExitCode.PERMANENT and expected in result.message
    assert dav.faults.log == []


def test_missing_source_and_bad_credentials_are_permanent_and_name_the_path(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    media_id = queue.add_media("h264_aac_mp4", source_path="/uploads/present.mp4")
    with queue.conn.cursor() as cur:
        cur.execute("UPDATE dharma.media_files SET source_path = '/uploads/gone.mp4'"
                    " WHERE id = %s", (media_id,))  # fmt: skip
    job_id = queue.enqueue(media_id)
    result = run_jobrunner(runner_env, job_id, queue.claim(job_id))
    assert result.code == ExitCode.PERMANENT
    assert "GET /uploads/gone.mp4: HTTP 404" in result.message
    runner_env["WEBDAV_PASSWORD"] = "wrong"
    _, result = _run(queue, runner_env, "h264_aac_mp4")
    assert result.code == ExitCode.PERMANENT and "HTTP 401" in result.message
    assert "wrong" not in result.message and "wrong" not in result.stderr


def test_webdav_that_fails_a_few_requests_is_retried(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    dav.faults.fail(2, status=503, method="GET")
    dav.faults.fail(2, status=502, method="PUT")
    dav.faults.fail(1, status=500, method="MKCOL")
    job, result = _run(queue, runner_env, "h264_aac_mp4")
    assert result.code == 0, result.stderr
    assert len(result.events("webdav_retry")) == 5
    out = _artifacts(dav, job)
    assert all((out / "hls" / s).is_file() for s in _playlist_segments(out / "hls/playlist.m3u8"))


def test_playlist_is_uploaded_after_its_segments(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    runner_env["HLS_SHARD_SECONDS"] = "1"
    dav.faults.clear()
    _, result = _run(queue, runner_env, "vp9_opus_webm")
    assert result.code == 0, result.stderr
    puts = [r for r in dav.faults.log if r.method == "PUT"]
    segment_puts = [r for r in puts if r.path.endswith(".ts")]
    assert len(segment_puts) >= 10
    assert puts[-1].path.endswith("/hls/playlist.m3u8")
    assert max(r.at for r in segment_puts) <= puts[-1].at


def test_webdav_down_is_temporary(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path
) -> None:
    dav.faults.fail(100, status=503)
    runner_env["HTTP_RETRIES"] = "3"
    _, result = _run(queue, runner_env, "audio_mp3")
    assert result.code == ExitCode.TEMPORARY
    assert "failed after 3 tries" in result.message and "HTTP 503" in result.message
    runner_env["WEBDAV_BASE_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    _, result = _run(queue, runner_env, "audio_mp3")
    assert result.code == ExitCode.TEMPORARY and "ConnectionError" in result.message
    _assert_clean_scratch(scratch)


def test_rerun_replaces_subtitles_without_duplicates(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    job, result = _run(queue, runner_env, "audio_aac_m4a")
    assert result.code == 0, result.stderr
    with queue.conn.cursor() as cur:  # the weightless model may emit nothing: seed known rows
        cur.execute(
            "INSERT INTO dharma.subtitles (media_id, start_time_ms, end_time_ms, text)"
            " SELECT %s, g * 1000, g * 1000 + 500, 'line ' || g FROM generate_series(0, 9) g",
            (job.media_id,),
        )
    first = queue.rows("SELECT start_time_ms, text FROM dharma.subtitles WHERE media_id = %s"
                       " ORDER BY 1", job.media_id)  # fmt: skip
    attempt = queue.claim(job.job_id)  # a second attempt of the same job
    result = run_jobrunner(runner_env, job.job_id, attempt)
    assert result.code == 0, result.stderr
    second = queue.rows("SELECT start_time_ms, text FROM dharma.subtitles WHERE media_id = %s"
                        " ORDER BY 1", job.media_id)  # fmt: skip
    assert len(first) == 10 + len(second)  # the seeded rows were replaced, nothing duplicated
    assert len(second) == len(set(second))


def test_stale_attempt_changes_nothing(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    job = queue.job("h264_aac_mp4")
    queue.claim(job.job_id)  # the controller gave up on attempt 1 and claimed attempt 2
    dav.faults.clear()
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.FENCED
    assert "attempt 1 no longer owns it" in result.message
    assert [r for r in dav.faults.log if r.method != "GET"] == []
    assert queue.row("SELECT progress, result_attempt FROM dharma.stt_jobs WHERE id = %s",
                     job.job_id) == (None, None)  # fmt: skip


def test_cancelled_job_is_not_processed(queue: Queue, runner_env: dict[str, str]) -> None:
    job = queue.job("audio_mp3")
    with queue.conn.cursor() as cur:
        cur.execute("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s", (job.job_id,))
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.FENCED and "cancelled" in result.message


def test_missing_job_and_bad_language_and_bad_config(
    queue: Queue, runner_env: dict[str, str]
) -> None:
    result = run_jobrunner(runner_env, 987654, 1)
    assert result.code == ExitCode.PERMANENT and "job 987654 does not exist" in result.message
    _, result = _run(queue, runner_env, "audio_mp3", language="klingon")
    assert result.code == ExitCode.PERMANENT and "'klingon'" in result.message
    env = {k: v for k, v in runner_env.items() if k != "WEBDAV_BASE_URL"}
    result = run_jobrunner(env, 1, 1)
    assert result.code == ExitCode.PERMANENT
    assert result.message == "runner configuration error: WEBDAV_BASE_URL is required but not set"
    runner_env["WHISPER_MODEL"] = "/nonexistent/ggml-base.bin"
    _, result = _run(queue, runner_env, "audio_mp3")
    assert result.code == ExitCode.PERMANENT and "/nonexistent/ggml-base.bin" in result.message


def test_unreachable_database_is_temporary(runner_env: dict[str, str]) -> None:
    runner_env["DB_PORT"] = "9"
    runner_env["DB_CONNECT_TIMEOUT"] = "2"
    result = run_jobrunner(runner_env, 1, 1)
    assert result.code == ExitCode.TEMPORARY and "cannot connect to PostgreSQL" in result.message
    assert runner_env["DB_PASSWORD"] not in result.message + result.stderr


@pytest.mark.parametrize("delay", [0.0, 0.5, 2.0])  # audio extraction, model load, encoding
def test_sigterm_stops_cleanly_and_removes_scratch(
    queue: Queue, runner_env: dict[str, str], scratch: Path, delay: float
) -> None:
    """SIGTERM in any phase is temporary (never blamed on the media) and cleans up."""
    from devtools.media import MEDIA_CACHE, make_long_talk

    source = make_long_talk(MEDIA_CACHE, 40, "640x360", "vp9")
    job = queue.job(source)
    runner_env["X264_PRESET"] = "medium"
    proc = start_jobrunner(runner_env, job.job_id, job.attempt)
    assert proc.stderr is not None
    read_until_action(proc.stderr, "plan")  # wait until it is encoding and transcribing
    time.sleep(delay)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == ExitCode.TEMPORARY
    message = Path(runner_env["TERMINATION_MESSAGE_PATH"]).read_text()
    assert "SIGTERM" in message
    _assert_clean_scratch(scratch)
    leftover = subprocess.run(["pgrep", "-f", str(scratch)], capture_output=True, check=False)
    assert leftover.stdout == b"", "ffmpeg children outlived the runner"


@pytest.mark.skipif(not (MODELS / "ggml-tiny.en.bin").exists(), reason="no real model present")
def test_real_model_turns_speech_into_subtitles(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    runner_env["WHISPER_MODEL"] = str(MODELS / "ggml-tiny.en.bin")
    job, result = _run(queue, runner_env, "vp9_opus_webm", language="en")
    assert result.code == 0, result.stderr
    rows = queue.rows("SELECT start_time_ms, end_time_ms, text FROM dharma.subtitles"
                      " WHERE media_id = %s ORDER BY start_time_ms", job.media_id)  # fmt: skip
    text = " ".join(r[2] for r in rows).lower()
    assert "ask not what your country can do for you" in text.replace(",", "")
    assert all(0 <= start <= end <= 11_100 for start, end, _ in rows)
    vtt = (_artifacts(dav, job) / "subtitles.vtt").read_text()
    assert "your country" in vtt and " --> " in vtt


@pytest.mark.skipif(not (MODELS / "ggml-base.bin").exists(), reason="no multilingual model")
def test_real_multilingual_model_with_job_language(
    queue: Queue, runner_env: dict[str, str]
) -> None:
    runner_env["WHISPER_MODEL"] = str(MODELS / "ggml-base.bin")
    runner_env["WHISPER_LANGUAGE"] = "zh"  # the default language; the job's own wins
    job, result = _run(queue, runner_env, "audio_mp3", language="en")
    assert result.code == 0, result.stderr
    text = " ".join(r[0] for r in queue.rows(
        "SELECT text FROM dharma.subtitles WHERE media_id = %s", job.media_id)).lower()  # fmt: skip
    assert "your country" in text


@pytest.mark.parametrize("how", ["sigterm", "cancel"])
def test_stop_during_upload_ends_within_seconds_without_draining_the_queue(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, scratch: Path, how: str,
) -> None:  # fmt: skip
    """40 one-second HLS segments, two upload workers, every segment PUT stalled 6 s by
    the server: uploading takes about two minutes. A SIGTERM or a cancellation (the row's
    status, seen by the fence check) once the first segment is stored must end the process
    within seconds: no further uploads start (the pool used to drain its whole queue after
    a cancellation), the two in flight are abandoned rather than waited for (the process
    used to wait for them at exit), and the playlist is never uploaded."""
    from devtools.media import MEDIA_CACHE, make_long_talk

    job = queue.job(make_long_talk(MEDIA_CACHE, 40, "320x240", "vp9"))
    runner_env.update(HLS_SHARD_SECONDS="1", UPLOAD_CONCURRENCY="2")
    dav.faults.clear()
    dav.faults.stall(1000, 6.0, method="PUT", path=".ts")
    proc = start_jobrunner(runner_env, job.job_id, job.attempt)
    deadline = time.monotonic() + 120
    while not [r for r in dav.faults.log if r.method == "PUT" and r.path.endswith(".ts")]:
        assert proc.poll() is None and time.monotonic() < deadline, "no segment was uploaded"
        time.sleep(0.05)
    stopped = time.monotonic()
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        with queue.conn.cursor() as cur:
            cur.execute("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s",
                        (job.job_id,))  # fmt: skip
    _, stderr = proc.communicate(timeout=60)
    elapsed = time.monotonic() - stopped
    late = [r for r in dav.faults.log if r.method == "PUT" and r.at > stopped]
    assert proc.returncode == (ExitCode.TEMPORARY if how == "sigterm" else ExitCode.FENCED)
    assert elapsed < 4, f"took {elapsed:.1f} s to stop; {len(late)} PUTs after the stop"
    assert len(late) <= 4, f"{len(late)} uploads after the stop: {[r.path for r in late]}"
    assert not any(r.path.endswith(".m3u8") for r in dav.faults.log), stderr
    _assert_clean_scratch(scratch)
