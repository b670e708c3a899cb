"""One job attempt, end to end: fence check, download, probe, encode once, transcribe,
upload, record. The order is chosen so that a crash at any line loses nothing and a stale
attempt changes nothing:

- results are written to the database last, in one fenced transaction, after every
  artifact is on WebDAV — a job is never "done" with files missing;
- the HLS playlist is uploaded after its segments, so a player never sees a playlist
  pointing at a missing segment; segment names are unique per attempt, and once the
  playlist is up the segments it does not refer to (an earlier run's) are deleted, while
  the attempt still owns its row — never a mix of two runs' segments (issue 10, defect 11);
- the scratch directory is removed on every path out, including SIGTERM.
"""

from __future__ import annotations

import logging
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from dharma_common.logs import current_context, log_context
from jobrunner.errors import BadMediaError, FencedOut, TemporaryError
from jobrunner.ffmpeg import FFmpegProcess, run_ffmpeg
from jobrunner.models import chosen_model, verify_model
from jobrunner.paths import ArtifactLayout, dav_segments, source_extension, url_path
from jobrunner.plan import (
    EncodeOptions,
    Workspace,
    make_plan,
    playlist_segments,
    run_name,
    stale_segments,
)
from jobrunner.probe import check_usable, parse_probe, run_ffprobe
from jobrunner.script import Speech, check_prompt, convert_segments, parse_language
from jobrunner.settings import RunnerSettings
from jobrunner.store import Attempt, RunnerStore
from jobrunner.subtitles import Segment, clean_segments, render_webvtt
from jobrunner.transcribe import Budget, Transcriber, WhisperCpp, check_language
from jobrunner.webdav import WebDAVClient

log = logging.getLogger("jobrunner")

#: Share of the progress bar given to transcription; the rest is packaging and upload.
_TRANSCRIBE_SHARE = 0.9


class Interrupted(TemporaryError):
    """SIGTERM (deadline, node drain, cancellation): stop, clean up, let the controller decide."""


def peak_rss_bytes() -> int:
    """This process's peak RSS: Linux reports `ru_maxrss` in KiB. FFmpeg's children are
    not included (they are separate processes, and the pod's limit covers them too)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Stop:
    """Set by SIGTERM or a lost fence. Python code checks it; whisper polls it by callback.
    `error` is what the attempt must end with: temporary for SIGTERM, fenced for a lost row."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.error: type[TemporaryError | FencedOut] = Interrupted
        self.in_native = False

    def __call__(self) -> bool:
        return self.reason is not None

    def set(self, error: type[TemporaryError | FencedOut], reason: str) -> None:
        if self.reason is None:  # the first cause wins
            self.error, self.reason = error, reason


@contextmanager
def _sigterm(stop: _Stop) -> Iterator[None]:
    """Turn SIGTERM into `Interrupted` — except inside whisper.cpp, where raising through C
    code is unsafe; there the abort callback sees the flag within a second."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set(Interrupted, "terminated by SIGTERM (deadline, node drain or cancellation)")
        if not stop.in_native:
            raise stop.error(stop.reason)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Progress:
    """Throttled, fenced progress writes from a background thread. A write that finds the row
    no longer ours stops the attempt (via `_Stop`)."""

    def __init__(self, store: RunnerStore, stop: _Stop, interval: float) -> None:
        self._store, self._stop, self._interval = store, stop, interval
        self._value: float | None = None
        self._written: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._context = current_context()

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def update(self, value: float) -> None:
        self._value = value

    def _flush(self) -> None:
        value = self._value
        if value is None or value == self._written:
            return
        try:
            owned = self._store.set_progress(value)
        except TemporaryError as exc:
            log.warning(
                "progress not written", extra={"action": "progress_not_written", "error": str(exc)}
            )
            return
        self._written = value
        if not owned:
            self._stop.set(
                FencedOut, "the job is no longer owned by this attempt (cancelled or retried)"
            )

    def _loop(self) -> None:
        with log_context(**self._context):
            while not self._done.wait(self._interval or 0.5):
                self._flush()
            self._flush()


def _timed(timings: dict[str, float], name: str) -> Callable[[], None]:
    start = time.monotonic()

    def done() -> None:
        timings[name] = round(time.monotonic() - start, 3)

    return done


def _wait_owned(main: FFmpegProcess, store: RunnerStore, interval: float) -> None:
    """Wait for the encode while checking the fence every `interval` seconds, so a cancelled
    or superseded attempt stops encoding instead of finishing an hour of work for nothing
    (when whisper runs beside the encode, its progress writes do this check)."""
    while not main.finished(interval or 0.5):
        try:
            owned = store.still_owned()
        except TemporaryError as exc:
            log.warning(
                "fence not checked", extra={"action": "fence_not_checked", "error": str(exc)}
            )
            continue
        if not owned:
            raise FencedOut("the job is no longer owned by this attempt (cancelled or retried)")
    main.wait()


class _Fence:
    """Between uploads: stop at once on SIGTERM or a lost fence, and ask the database whether
    the row is still ours at most every `interval` seconds (a cancellation shows only there:
    no progress writes run during the upload)."""

    def __init__(self, store: RunnerStore, stop: _Stop, interval: float) -> None:
        self._store, self._stop, self._interval = store, stop, interval or 0.5
        self._checked = time.monotonic()

    def check(self) -> None:
        """Between two uploads: the stop flag always, the database when `interval` has
        passed; a database that cannot answer just now does not stop the upload."""
        if self._stop.reason is not None:
            raise self._stop.error(self._stop.reason)
        if time.monotonic() - self._checked < self._interval:
            return
        try:
            self.check_now()
        except TemporaryError as exc:
            log.warning(
                "fence not checked", extra={"action": "fence_not_checked", "error": str(exc)}
            )

    def check_now(self) -> None:
        """Ask the database now, unthrottled: before a write that a stale attempt must never
        make (the playlist, a DELETE), however recently the row was seen. A database that
        cannot answer fails the attempt (temporary): unverified, nothing is written."""
        if self._stop.reason is not None:
            raise self._stop.error(self._stop.reason)
        self._checked = time.monotonic()
        if not self._store.still_owned():
            self._stop.set(FencedOut, "the job is no longer owned by this attempt (cancelled "
                           "or retried); the upload was stopped")  # fmt: skip
            raise FencedOut(self._stop.reason)


def _upload_all(
    dav: WebDAVClient, files: list[tuple[Path, list[str]]], workers: int, fence: _Fence
) -> None:
    """Upload `files` on `workers` daemon threads while this thread checks the fence. On a
    stop nothing new starts, and the uploads in flight are abandoned, not waited for: a
    stalled server must not hold a cancelled attempt (daemon threads die with the process,
    where a ThreadPoolExecutor's are joined at exit)."""
    pending = list(reversed(files))
    lock, halt = threading.Lock(), threading.Event()
    failures: list[BaseException] = []
    context = current_context()

    def worker() -> None:
        with log_context(**context):
            while not halt.is_set():
                with lock:
                    if not pending:
                        return
                    item = pending.pop()
                try:
                    dav.put(*item)
                except BaseException as exc:  # handed to the main thread, which re-raises
                    failures.append(exc)
                    halt.set()

    threads = [
        threading.Thread(target=worker, name=f"upload-{n}", daemon=True)
        for n in range(min(workers, len(files)))
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive() and not failures:
                thread.join(0.1)
                fence.check()
        if failures:
            raise failures[0]
    finally:
        halt.set()


def upload_artifacts(
    dav: WebDAVClient, ws: Workspace, layout: ArtifactLayout, workers: int, fence: _Fence
) -> int:
    """MKCOL the tree, upload files in parallel, the playlist strictly last, then remove
    what an earlier run left that this run's artifacts do not include (`remove_stale`)."""
    for collection in layout.collections():
        fence.check()
        dav.mkcol(collection)
    files: list[tuple[Path, list[str]]] = []
    for path in (ws.video, ws.audio, ws.vtt):
        if path.exists():
            files.append((path, layout.file(path.name)))
    files += [(p, layout.file("hls", p.name)) for p in sorted(ws.hls.glob("*.ts"))]
    _upload_all(dav, files, workers, fence)
    # Unthrottled: a stale attempt's late playlist would point at segments the owner deletes.
    fence.check_now()
    dav.put(ws.playlist, layout.file("hls", ws.playlist.name))
    remove_stale(dav, ws, layout, fence)
    return len(files) + 1


def remove_stale(dav: WebDAVClient, ws: Workspace, layout: ArtifactLayout, fence: _Fence) -> int:
    """Delete an earlier run's leftovers once this run's playlist is up (issue 10, defect
    11): every segment in hls/ the new playlist does not refer to (a run with fewer segments
    would otherwise leave the rest, and a stale attempt's late PUTs land under its own
    names), and video.mp4/audio.m4a when this run made none (an audio-only source replacing
    a video one). Each DELETE, including a retried one, is sent only after the database
    confirmed that this attempt still owns its row, so a superseded attempt never deletes the
    segments of the run that replaced it; a name already gone (404) is fine. Returns the
    number of deletes."""
    referenced = playlist_segments(ws.playlist.read_text(encoding="utf-8"))
    fence.check_now()
    names = stale_segments(dav.list_files(layout.file("hls")), referenced)
    targets = [layout.file("hls", name) for name in names]
    targets += [layout.file(path.name) for path in (ws.video, ws.audio) if not path.exists()]
    for target in targets:
        dav.delete(target, before=fence.check_now)
    if names:
        log.info(
            "stale segments deleted",
            extra={"action": "stale_segments_deleted", "files": len(names)},
        )
    return len(targets)


def run_attempt(
    settings: RunnerSettings,
    job_id: int,
    attempt: int,
    transcriber: Callable[[], Transcriber] | None = None,
) -> None:
    """Process one claimed attempt; raises a `RunnerError` subclass on failure."""
    stop = _Stop()
    model = chosen_model(settings)
    make_transcriber = transcriber or (
        lambda: WhisperCpp(
            model.path,
            settings.WHISPER_THREADS,
            settings.WHISPER_BEAM_SIZE,
            settings.WHISPER_WINDOW_SECONDS,
            budget=Budget(
                settings.TRANSCRIBE_BUDGET_FACTOR, settings.TRANSCRIBE_BUDGET_FLOOR_SECONDS
            ),
        )
    )
    with _sigterm(stop), log_context(job_id=job_id, attempt=attempt):
        store = RunnerStore(settings, job_id, attempt)
        try:
            job = store.load()
            with log_context(media_id=str(job.media_id)):
                layout = ArtifactLayout.for_media(job.category_id, job.created_at, job.media_id)
                source = dav_segments(job.source_path, "media source_path")
                speech = job_speech(settings, job)
                if transcriber is None:
                    # Before the download: a wrong model fails in a second, not after it.
                    verify_model(model)
                settings.SCRATCH_DIR.mkdir(parents=True, exist_ok=True)
                scratch = Path(
                    tempfile.mkdtemp(
                        prefix=f"dharma-job{job_id}-a{attempt}-", dir=settings.SCRATCH_DIR
                    )
                )
                try:
                    ws = Workspace(
                        scratch, source_extension(job.source_path), run_name(job_id, attempt)
                    )
                    _process(
                        settings, store, stop, ws, layout, source, speech,
                        make_transcriber,
                    )  # fmt: skip
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
        finally:
            store.close()


def job_speech(settings: RunnerSettings, job: Attempt) -> Speech:
    """The job's language (its own, else WHISPER_LANGUAGE), script of its Chinese text (the
    tag's, else CHINESE_SCRIPT; for `auto`, of the windows detected as Chinese) and prompt
    (its own `initial_prompt`, else WHISPER_PROMPTS for its language). A bad value is
    permanent."""
    chosen = parse_language(job.language or settings.WHISPER_LANGUAGE)
    language = check_language(chosen.whisper)
    script = chosen.script_for(settings.CHINESE_SCRIPT)
    if job.initial_prompt is not None:
        prompt = check_prompt(job.initial_prompt, "the job's initial_prompt")
        return Speech(language, script, prompt, "job")
    prompt = settings.WHISPER_PROMPTS.get(language, "")
    return Speech(language, script, prompt, "setting" if prompt else "none")


def _transcribe(
    settings: RunnerSettings,
    store: RunnerStore,
    stop: _Stop,
    pcm: Path,
    speech: Speech,
    make_transcriber: Callable[[], Transcriber],
    timings: dict[str, float],
) -> list[Segment]:
    """whisper over the extracted audio, with fenced progress writes; a stop (SIGTERM, a
    lost row) seen during the run ends the attempt with its error."""
    model = make_transcriber()
    log.info("transcription started", extra={"action": "transcription_started"})
    done = _timed(timings, "transcribe")
    with _Progress(store, stop, settings.PROGRESS_INTERVAL_SECONDS) as progress:
        stop.in_native = True
        try:
            segments = model.transcribe(
                pcm, speech.language, lambda f: progress.update(f * _TRANSCRIBE_SHARE), stop,
                prompt=speech.prompt,
            )  # fmt: skip
        finally:
            stop.in_native = False
    done()
    if stop.reason is not None:
        raise stop.error(stop.reason)
    return segments


def _subtitles(
    segments: list[Segment], duration: float, speech: Speech, vtt: Path
) -> list[Segment]:
    """Clean whisper's segments, convert them to the job's script, and write the WebVTT
    file. Converted once, here: the subtitle rows and the WebVTT file are the same text."""
    cleaned = convert_segments(
        clean_segments(segments, int(duration * 1000)), speech.script, speech.language
    )
    vtt.write_text(render_webvtt(cleaned), encoding="utf-8")
    return cleaned


def _upload(
    settings: RunnerSettings,
    store: RunnerStore,
    stop: _Stop,
    dav: WebDAVClient,
    ws: Workspace,
    layout: ArtifactLayout,
    timings: dict[str, float],
) -> None:
    """Every artifact to WebDAV, fenced (`upload_artifacts`), if the row is still ours."""
    if not store.still_owned():
        raise FencedOut("the job is no longer owned by this attempt; nothing was uploaded")
    done = _timed(timings, "upload")
    fence = _Fence(store, stop, settings.PROGRESS_INTERVAL_SECONDS)
    uploaded = upload_artifacts(dav, ws, layout, settings.UPLOAD_CONCURRENCY, fence)
    done()
    log.info(
        "artifacts uploaded",
        extra={"action": "artifacts_uploaded", "files": uploaded, "seconds": timings["upload"]},
    )


def _process(
    settings: RunnerSettings,
    store: RunnerStore,
    stop: _Stop,
    ws: Workspace,
    layout: ArtifactLayout,
    source: list[str],
    speech: Speech,
    make_transcriber: Callable[[], Transcriber],
) -> None:
    timings: dict[str, float] = {}
    dav = WebDAVClient(
        settings.WEBDAV_BASE_URL,
        settings.WEBDAV_USER,
        settings.WEBDAV_PASSWORD.get_secret_value(),
        timeout=settings.HTTP_TIMEOUT_SECONDS,
        retries=settings.HTTP_RETRIES,
        backoff=settings.HTTP_BACKOFF_SECONDS,
    )
    log.info(
        "attempt started",
        extra={
            "action": "run_started",
            "source": url_path(source),
            "language": speech.language,
            "script": speech.script.value,
            "prompt_origin": speech.prompt_origin,
            "prompt_chars": len(speech.prompt),
        },
    )

    done = _timed(timings, "download")
    size = dav.download(source, ws.source, settings.MAX_SOURCE_BYTES)
    done()
    if size == 0:
        raise BadMediaError(f"source {url_path(source)} is empty (0 bytes)")
    log.info(
        "source downloaded",
        extra={"action": "source_downloaded", "bytes": size, "seconds": timings["download"]},
    )

    info = parse_probe(run_ffprobe(ws.source))
    check_usable(info, settings.MAX_DURATION_SECONDS)
    opts = EncodeOptions(
        bitrate=settings.HLS_BITRATE,
        shard_seconds=settings.HLS_SHARD_SECONDS,
        audio_bitrate=settings.AUDIO_BITRATE,
        preset=settings.X264_PRESET,
    )
    plan = make_plan(info, ws, opts)
    ws.hls.mkdir()
    # Whisper and x264 on the same cores slow each other down more than they gain: whisper's
    # threads spin at their barriers while x264 holds the CPU (docs/performance.md, table 1).
    # A stream copy or an audio-only pass is light, so those still run beside whisper.
    overlap = settings.OVERLAP_VIDEO_ENCODE or plan.copy_video is not False
    log.info(
        "plan",
        extra={
            "action": "plan",
            "video": info.video.codec if info.video else None,
            "audio": info.audio.codec if info.audio else None,
            "copy_video": plan.copy_video,
            "copy_audio": plan.copy_audio,
            "source_duration": info.duration,
            "overlap": overlap,
        },
    )

    if plan.pcm is not None:
        done = _timed(timings, "extract_audio")
        run_ffmpeg(plan.pcm, ws.root / "pcm.log", "extract the audio track")
        done()

    done = _timed(timings, "encode")
    main = FFmpegProcess(plan.main, ws.root / "main.log", "convert the source")
    segments = []
    try:
        if not overlap:
            _wait_owned(main, store, settings.PROGRESS_INTERVAL_SECONDS)
            done()
            log.info(
                "source converted",
                extra={"action": "source_converted", "seconds": timings["encode"]},
            )
        if plan.pcm is not None:
            segments = _transcribe(settings, store, stop, ws.pcm, speech, make_transcriber,
                                   timings)  # fmt: skip
        if overlap:
            main.wait()
            done()
            log.info(
                "source converted",
                extra={"action": "source_converted", "seconds": timings["encode"]},
            )
    except BaseException:
        main.kill()
        raise

    done = _timed(timings, "package")
    run_ffmpeg(plan.package, ws.root / "package.log", "package HLS and M4A")
    out_info = parse_probe(run_ffprobe(ws.video if info.video else ws.audio))
    done()
    duration = out_info.duration or info.duration
    cleaned = _subtitles(segments, duration, speech, ws.vtt)

    _upload(settings, store, stop, dav, ws, layout, timings)
    store.commit_results(layout.media_id, cleaned, duration)
    peak = peak_rss_bytes()
    log.info(
        "attempt succeeded",
        extra={
            "action": "run_succeeded",
            "subtitles": len(cleaned),
            "duration": duration,
            "timings": timings,
            "peak_rss_mib": round(peak / 2**20, 1),
        },
    )
