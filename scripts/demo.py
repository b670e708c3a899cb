"""The one-command demo: a talk end to end on this machine, with real services.

Started by `scripts/demo` (which installs what is missing first). PostgreSQL and WsgiDAV run
locally just for the demo; the controller runs with the local executor and
`--exit-when-idle`, launching the real jobrunner exactly as it would in production.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402
import requests  # noqa: E402

from devtools.media import JFK, MODELS, WEIGHTLESS_MODEL  # noqa: E402
from devtools.services import PostgresServer, WebDAVServer  # noqa: E402
from dharma_common.settings import DatabaseSettings  # noqa: E402

STEPS: list[tuple[str, float]] = []
CONTROLLER = [sys.executable, "-m", "controller"]  # the `dharma-controller` entry point


@contextmanager
def step(name: str) -> Iterator[None]:
    print(f"==> {name}", flush=True)
    start = time.perf_counter()
    yield
    STEPS.append((name, time.perf_counter() - start))


def pick_model() -> tuple[Path, bool]:
    """WHISPER_MODEL when it exists, else a real model shipped beside the repo, else the
    weightless test model (which runs the whole pipeline but produces meaningless text)."""
    candidates = [os.environ.get("WHISPER_MODEL", "")]
    candidates += [str(MODELS / "ggml-base.bin"), str(MODELS / "ggml-tiny.en.bin")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate), True
    return WEIGHTLESS_MODEL, False


def make_sample(directory: Path) -> Path:
    """A 26-second 640x360 VP9/Opus talk: a test pattern with JFK's speech twice, a pause
    after each (back-to-back identical lines would be collapsed as a whisper loop)."""
    path = directory / "sample talk.webm"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         "testsrc2=size=640x360:rate=25:duration=26", "-i", str(JFK), "-filter_complex",
         "[1:a]apad=pad_dur=2,asplit[a][b];[a][b]concat=n=2:v=0:a=1[speech]",
         "-map", "0:v", "-map", "[speech]", "-c:v", "libvpx-vp9", "-deadline", "realtime",
         "-cpu-used", "8", "-b:v", "500k", "-c:a", "libopus", "-t", "26", str(path)],
        check=True,
    )  # fmt: skip
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("file", nargs="?", type=Path, help="a video or audio file to process")
    parser.add_argument("--language", help="whisper language (default: en for the sample)")
    parser.add_argument("--keep", action="store_true", help="keep serving WebDAV until Ctrl-C")
    args = parser.parse_args()
    if args.file and not args.file.is_file():
        parser.error(f"{args.file} is not a file")
    return args


def announce_model() -> Path:
    """`pick_model()`, saying loudly when no real model was found: the demo still runs end
    to end, but its subtitles would otherwise look like a bug."""
    model, real = pick_model()
    if real:
        print(f"whisper model: {model}")
    else:
        print("whisper model: NO REAL MODEL FOUND (set WHISPER_MODEL=/path/to/ggml-base.bin).")
        print(f"  Falling back to the weightless test model {model}: the pipeline runs end to")
        print("  end, but the subtitle text will be meaningless.")
    return model


def migrated_database(
    pg: PostgresServer, dav: WebDAVServer, model: Path, work: Path
) -> tuple[DatabaseSettings, dict[str, str]]:
    """Create the `dharma` database and migrate it with `dharma-controller migrate`, as an
    operator would: its settings, and the environment the controller (and so its runners)
    runs with."""
    with closing(pg.admin()) as admin, admin.cursor() as cur:
        cur.execute("CREATE DATABASE dharma")
    db = pg.settings("dharma")
    env = {
        **os.environ,
        "DB_HOST": db.DB_HOST, "DB_PORT": str(db.DB_PORT), "DB_NAME": db.DB_NAME,
        "DB_USER": db.DB_USER, "DB_PASSWORD": db.DB_PASSWORD.get_secret_value(),
        **dav.env(), "WHISPER_MODEL": str(model), "SCRATCH_DIR": str(work / "scratch"),
        "LOCAL_SCRATCH_DIR": str(work / "scratch"), "METRICS_PORT": "0",
        "POLL_INTERVAL_SECONDS": "1",
    }  # fmt: skip
    with step("migrate (dharma-controller migrate)"):
        subprocess.run([*CONTROLLER, "migrate"], env=env, check=True)
    return db, env


def upload(dav: WebDAVServer, source: Path) -> str:
    """PUT the talk to WebDAV's /uploads over HTTP, as the admin's upload would: its path."""
    path = f"/uploads/{source.name}"
    with source.open("rb") as body:
        requests.request("MKCOL", f"{dav.base_url}/uploads", auth=(dav.user, dav.password),
                         timeout=30)  # fmt: skip
        put = requests.put(dav.base_url + quote(path), data=body,
                           auth=(dav.user, dav.password), timeout=300)  # fmt: skip
        put.raise_for_status()
    return path


def insert_job(conn: Any, source: Path, path: str, language: str | None) -> tuple[str, Any, int]:
    """The media row and its job, as the admin's upload inserts them: (media id, its
    created_at, job id)."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (title, category_id, source_path)"
            " VALUES (%s, 'demo', %s) RETURNING id, created_at", (source.stem, path),
        )  # fmt: skip
        media_id, created_at = cur.fetchone()
        cur.execute("INSERT INTO dharma.stt_jobs (media_id, language) VALUES (%s, %s)"
                    " RETURNING id", (media_id, language))  # fmt: skip
        job_id = cur.fetchone()[0]
    return media_id, created_at, job_id


def runner_timings(stderr: str) -> dict[str, float]:
    """The runner's per-stage timings from its `run_succeeded` log line (the last one), or
    none when it did not succeed."""
    timings: dict[str, float] = {}
    for line in stderr.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("action") == "run_succeeded":
            timings = record.get("timings", {})
    return timings


@dataclass
class Outcome:
    """What the database says about the demo's job once the controller has exited."""

    status: str
    error: str | None
    attempts: int
    duration: float | None
    subtitles: list[tuple[int, int, str]]


def read_outcome(conn: Any, job_id: int, media_id: str) -> Outcome:
    """The job's status and the media's duration and subtitles, read back from the database
    (what the runner committed, not what it logged)."""
    with conn.cursor() as cur:
        cur.execute("SELECT status, error_message, attempts FROM dharma.stt_jobs WHERE id = %s",
                    (job_id,))  # fmt: skip
        status, error, attempts = cur.fetchone()
        cur.execute("SELECT duration_seconds FROM dharma.media_files WHERE id = %s",
                    (media_id,))  # fmt: skip
        duration = cur.fetchone()[0]
        cur.execute("SELECT start_time_ms, end_time_ms, text FROM dharma.subtitles"
                    " WHERE media_id = %s ORDER BY start_time_ms", (media_id,))  # fmt: skip
        subtitles = cur.fetchall()
    return Outcome(status, error, attempts, duration, subtitles)


def print_results(
    outcome: Outcome, dav: WebDAVServer, base: str, keep: bool, timings: dict[str, float]
) -> None:
    """Where the results are (WebDAV URLs and on disk), the subtitles, and the timings of
    the demo's steps and of the runner's stages."""
    print(f"duration: {outcome.duration:.1f} s")
    print(f"HLS playlist: {dav.base_url}{base}/hls/playlist.m3u8")
    print(f"subtitles:    {dav.base_url}{base}/subtitles.vtt")
    print(f"on disk:      {dav.root}{base}/" + ("" if keep else "  (removed on exit; --keep)"))
    print(f"\nsubtitles ({len(outcome.subtitles)} rows in dharma.subtitles):")
    for start, end, text in outcome.subtitles:
        print(f"  {start / 1000:7.2f} → {end / 1000:7.2f}  {text}")
    print("\ntimings:")
    for name, seconds in STEPS:
        print(f"  {seconds:7.2f} s  {name}")
    for name, seconds in timings.items():
        print(f"  {seconds:7.2f} s    runner: {name}")


def serve_until_interrupted(dav: WebDAVServer) -> None:
    """--keep: leave WebDAV up so the results can be opened, until Ctrl-C."""
    print(f"\nServing WebDAV at {dav.base_url} (user {dav.user}); Ctrl-C to stop.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def run_demo(
    args: argparse.Namespace, model: Path, work: Path, pg: PostgresServer, dav: WebDAVServer
) -> int:
    """The demo proper, once PostgreSQL and WebDAV run (`main` stops them whatever happens
    here): migrate, upload and insert the job, run the controller until it is idle, then
    report."""
    db, env = migrated_database(pg, dav, model, work)
    with step("prepare the talk"):
        source = args.file or make_sample(work)
        language = args.language or (None if args.file else "en")
    with step(f"upload {source.name} to WebDAV"):
        path = upload(dav, source)
    conn = psycopg2.connect(**db.connect_kwargs("demo"))
    conn.autocommit = True
    media_id, created_at, job_id = insert_job(conn, source, path, language)
    print(f"    media {media_id}, job {job_id}")

    with step("process (dharma-controller run --executor local --exit-when-idle)"):
        run = subprocess.run(
            [*CONTROLLER, "run", "--executor", "local", "--exit-when-idle"],
            env=env, stderr=subprocess.PIPE, text=True, check=False,
        )  # fmt: skip
    timings = runner_timings(run.stderr)
    outcome = read_outcome(conn, job_id, media_id)
    conn.close()

    print()
    print(
        f"job {job_id}: {outcome.status} after {outcome.attempts} attempt(s)"
        + (f": {outcome.error}" if outcome.error else "")
    )
    if outcome.status != "completed":
        print(run.stderr[-4000:], file=sys.stderr)
        return 1
    print_results(outcome, dav, f"/demo/{created_at:%y%m}/{media_id}", args.keep, timings)
    if args.keep:
        serve_until_interrupted(dav)
    return 0


def main() -> int:
    args = parse_args()
    model = announce_model()
    work = Path(tempfile.mkdtemp(prefix="dharma-demo-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user when the demo runs as root

    with step("start PostgreSQL"):
        pg = PostgresServer(work / "pg")
        pg.start()
    with step("start WebDAV (WsgiDAV)"):
        dav = WebDAVServer(work / "dav")
    try:
        return run_demo(args, model, work, pg, dav)
    finally:
        dav.close()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
