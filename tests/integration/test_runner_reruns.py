"""Issue 10, defect 11: a media's runs never leave a mix of two runs' files or subtitles.

The real runner against real PostgreSQL, WsgiDAV and FFmpeg: a second run of a media with
fewer segments leaves exactly its own playlist's segments (an earlier run's, under any
naming, are deleted with WebDAV DELETE), an audio-only re-run removes the earlier video, a
superseded attempt deletes nothing, and a second job's results replace the first's
subtitles.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.media import make_media
from devtools.services import Database, WebDAVServer
from dharma_common.contract import ExitCode
from jobrunner.store import RunnerStore
from jobrunner.subtitles import Segment
from tests.conftest import Job, Queue
from tests.integration.runner import run_jobrunner, start_jobrunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _out(dav: WebDAVServer, job: Job) -> Path:
    return dav.path(f"talks/2510/{job.media_id}")


def _referenced(hls: Path) -> list[str]:
    text = (hls / "playlist.m3u8").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _next_job(queue: Queue, job: Job) -> Job:
    """The first job is over (the controller recorded it); a new job of the same media."""
    queue.row(
        "UPDATE dharma.stt_jobs SET status = 'completed' WHERE id = %s RETURNING id", job.job_id
    )
    job_id = queue.enqueue(job.media_id)
    return Job(job_id, job.media_id, queue.claim(job_id))


def test_a_rerun_with_fewer_segments_leaves_exactly_its_own(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    runner_env["HLS_SHARD_SECONDS"] = "1"
    first = queue.job("vp9_opus_webm")
    result = run_jobrunner(runner_env, first.job_id, first.attempt)
    assert result.code == 0, result.stderr
    hls = _out(dav, first) / "hls"
    assert len(_referenced(hls)) >= 10
    (hls / "segment00007.ts").write_bytes(b"left by a runner before issue 10, defect 11")
    (hls / "notes.txt").write_text("not the runner's: left alone")

    runner_env["HLS_SHARD_SECONDS"] = "4"
    second = _next_job(queue, first)
    dav.faults.clear()
    result = run_jobrunner(runner_env, second.job_id, second.attempt)
    assert result.code == 0, result.stderr
    referenced = _referenced(hls)
    assert 2 <= len(referenced) <= 4
    assert all(name.startswith(f"j{second.job_id}-a{second.attempt}-") for name in referenced)
    assert sorted(p.name for p in hls.iterdir()) == sorted(
        ["playlist.m3u8", "notes.txt", *referenced]
    )
    deletes = [r for r in dav.faults.log if r.method == "DELETE"]
    puts = [r for r in dav.faults.log if r.method == "PUT"]
    assert len(deletes) >= 11  # the first run's segments and the one planted
    assert min(r.at for r in deletes) >= puts[-1].at  # only after the new playlist is up
    assert puts[-1].path.endswith("/hls/playlist.m3u8")


def test_an_audio_only_rerun_removes_the_earlier_video(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer, media_dir: Path
) -> None:
    first = queue.job("h264_aac_mp4")
    assert run_jobrunner(runner_env, first.job_id, first.attempt).code == 0
    out = _out(dav, first)
    assert (out / "video.mp4").is_file()
    audio = make_media("audio_mp3", media_dir)
    dav.put_file(f"/uploads/replaced/{audio.name}", audio)
    queue.row(
        "UPDATE dharma.media_files SET source_path = %s WHERE id = %s RETURNING id",
        f"/uploads/replaced/{audio.name}",
        first.media_id,
    )
    second = _next_job(queue, first)
    result = run_jobrunner(runner_env, second.job_id, second.attempt)
    assert result.code == 0, result.stderr
    assert not (out / "video.mp4").exists()
    assert (out / "audio.m4a").is_file()
    hls = out / "hls"
    assert sorted(p.name for p in hls.iterdir()) == sorted(["playlist.m3u8", *_referenced(hls)])


def test_a_superseded_attempt_deletes_nothing(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    """The listing is held until the controller has given the row to attempt 2: attempt 1
    then sends no DELETE at all (each one is preceded by a fence check), so it can never
    remove the segments of the run that replaced it."""
    job = queue.job("audio_mp3")
    hls = _out(dav, job) / "hls"
    hls.mkdir(parents=True)
    (hls / "j999-a1-00000.ts").write_bytes(b"segment of another run")
    dav.faults.clear()
    dav.faults.stall(1, 20.0, method="PROPFIND")
    stalled = dav.faults.faults[-1]
    proc = start_jobrunner(runner_env, job.job_id, job.attempt)
    try:
        deadline = time.monotonic() + 120
        while stalled.remaining and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stalled.remaining == 0, "the runner never listed the hls collection"
        queue.claim(job.job_id)  # the controller gave up on attempt 1: attempt 2 owns the row
        dav.faults.released.set()  # end the stall now
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == ExitCode.FENCED, stderr
    assert [r for r in dav.faults.log if r.method == "DELETE"] == []
    assert (hls / "j999-a1-00000.ts").is_file()


def test_a_second_jobs_results_replace_the_first_jobs_subtitles(db: Database, queue: Queue) -> None:
    """DESIGN.md: re-running replaces a media's subtitles, never duplicates them — also when
    the re-run is a new job row (not a retry of the same one)."""
    media_id = queue.add_media("audio_mp3")
    jobs = []
    for lines in (["one", "two", "three"], ["uno", "dos"]):
        job_id = queue.enqueue(media_id)
        attempt = queue.claim(job_id)
        store = RunnerStore(db.settings, job_id, attempt)
        try:
            segments = [Segment(i * 1000, i * 1000 + 800, text) for i, text in enumerate(lines)]
            store.commit_results(media_id, segments, 3.0)
        finally:
            store.close()
        queue.row(
            "UPDATE dharma.stt_jobs SET status = 'completed' WHERE id = %s RETURNING id", job_id
        )
        jobs.append(job_id)
    assert queue.rows(
        "SELECT start_time_ms, end_time_ms, text FROM dharma.subtitles WHERE media_id = %s"
        " ORDER BY start_time_ms",
        media_id,
    ) == [(0, 800, "uno"), (1000, 1800, "dos")]
