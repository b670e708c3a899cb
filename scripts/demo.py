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
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg2  # noqa: E402
import requests  # noqa: E402

from devtools.media import JFK, MODELS, WEIGHTLESS_MODEL  # noqa: E402
from devtools.services import PostgresServer, WebDAVServer  # noqa: E402

STEPS: list[tuple[str, float]] = []


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


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    parser.add_argument("file", nargs="?", type=Path, help="a video or audio file to process")
    parser.add_argument("--language", help="whisper language (default: en for the sample)")
    parser.add_argument("--keep", action="store_true", help="keep serving WebDAV until Ctrl-C")
    args = parser.parse_args()
    if args.file and not args.file.is_file():
        parser.error(f"{args.file} is not a file")

    model, real = pick_model()
    if real:
        print(f"whisper model: {model}")
    else:
        print("whisper model: NO REAL MODEL FOUND (set WHISPER_MODEL=/path/to/ggml-base.bin).")
        print(f"  Falling back to the weightless test model {model}: the pipeline runs end to")
        print("  end, but the subtitle text will be meaningless.")
    work = Path(tempfile.mkdtemp(prefix="dharma-demo-"))
    work.chmod(0o755)  # PostgreSQL runs as its own user when the demo runs as root

    with step("start PostgreSQL"):
        pg = PostgresServer(work / "pg")
        pg.start()
    with step("start WebDAV (WsgiDAV)"):
        dav = WebDAVServer(work / "dav")
    try:
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
        controller = [sys.executable, "-m", "controller"]  # the `dharma-controller` entry point
        with step("migrate (dharma-controller migrate)"):
            subprocess.run([*controller, "migrate"], env=env, check=True)

        with step("prepare the talk"):
            source = args.file or make_sample(work)
            language = args.language or (None if args.file else "en")
        with step(f"upload {source.name} to WebDAV"):
            upload = f"/uploads/{source.name}"
            with source.open("rb") as body:
                requests.request("MKCOL", f"{dav.base_url}/uploads", auth=(dav.user, dav.password),
                                 timeout=30)  # fmt: skip
                put = requests.put(dav.base_url + quote(upload), data=body,
                                   auth=(dav.user, dav.password), timeout=300)  # fmt: skip
                put.raise_for_status()
        conn = psycopg2.connect(**db.connect_kwargs("demo"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO dharma.media_files (title, category_id, source_path)"
                " VALUES (%s, 'demo', %s) RETURNING id, created_at", (source.stem, upload),
            )  # fmt: skip
            media_id, created_at = cur.fetchone()
            cur.execute("INSERT INTO dharma.stt_jobs (media_id, language) VALUES (%s, %s)"
                        " RETURNING id", (media_id, language))  # fmt: skip
            job_id = cur.fetchone()[0]
        print(f"    media {media_id}, job {job_id}")

        with step("process (dharma-controller run --executor local --exit-when-idle)"):
            run = subprocess.run(
                [*controller, "run", "--executor", "local", "--exit-when-idle"],
                env=env, stderr=subprocess.PIPE, text=True, check=False,
            )  # fmt: skip
        runner_timings: dict[str, float] = {}
        for line in run.stderr.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("action") == "run_succeeded":
                runner_timings = record.get("timings", {})
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
        conn.close()

        print()
        print(
            f"job {job_id}: {status} after {attempts} attempt(s)" + (f": {error}" if error else "")
        )
        if status != "completed":
            print(run.stderr[-4000:], file=sys.stderr)
            return 1
        base = f"/demo/{created_at:%y%m}/{media_id}"
        print(f"duration: {duration:.1f} s")
        print(f"HLS playlist: {dav.base_url}{base}/hls/playlist.m3u8")
        print(f"subtitles:    {dav.base_url}{base}/subtitles.vtt")
        print(
            f"on disk:      {dav.root}{base}/"
            + ("" if args.keep else "  (removed on exit; --keep)")
        )
        print(f"\nsubtitles ({len(subtitles)} rows in dharma.subtitles):")
        for start, end, text in subtitles:
            print(f"  {start / 1000:7.2f} → {end / 1000:7.2f}  {text}")
        print("\ntimings:")
        for name, seconds in STEPS:
            print(f"  {seconds:7.2f} s  {name}")
        for name, seconds in runner_timings.items():
            print(f"  {seconds:7.2f} s    runner: {name}")
        if args.keep:
            print(f"\nServing WebDAV at {dav.base_url} (user {dav.user}); Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        dav.close()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
