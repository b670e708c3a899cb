"""Benchmark: the runner's peak memory on long talks (issue 10, "Long talks").

Generates dense spoken talks (an MP3, the speech sample with a pause after each sentence)
of 15 min, 1 h and 3 h, runs the real jobrunner on each (PostgreSQL, WebDAV download and
upload included), and prints the runner's own peak RSS (what it logs as `peak_rss_mib`:
its Python process, whisper.cpp and the model, without FFmpeg) and the peak of the process
tree (wait4, FFmpeg children included). The runner reads audio one transcription window
at a time, so its peak must be flat: within 10% from the shortest talk to the longest.

The baseline is the original specification's naive pipeline (bench/naive.py: whisper on
the whole file) on the same inputs in the same run, up to `--naive-up-to` seconds of talk
(it needs about 0.5 GB more per hour and its transcription alone takes as long as ours).

Usage: python -m bench.longtalk [--lengths 900,3600,10800] [--model PATH] [--naive-up-to 3600]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from bench.runs import claimed_attempt, runner_command
from devtools.log_actions import lines_with_action
from devtools.media import MODELS, make_spoken_talk
from devtools.services import DatabaseFactory, PostgresServer, WebDAVServer

CACHE = Path(os.environ.get("DHARMA_CACHE", Path.home() / ".cache" / "dharma-stream")) / "bench"
MIB = 2**20


@dataclass
class Run:
    wall: float
    #: Peak RSS of the process tree (wait4: the process or any of its children).
    tree_peak: int
    #: The runner's own peak RSS as it reports it (None for the naive pipeline).
    self_peak: int | None = None
    segments: int | None = None


def _run(cmd: list[str], env: dict[str, str]) -> tuple[Run, str]:
    """Run `cmd`, returning wall time, wait4's peak RSS and stderr."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Run(wall, usage.ru_maxrss * 1024), stderr


def _succeeded(stderr: str) -> dict[str, object]:
    for event in lines_with_action(stderr, "run_succeeded"):
        return dict(event)
    raise SystemExit("the runner did not log its success:\n" + stderr[-3000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lengths", default="900,3600,10800", help="talk lengths in seconds")
    parser.add_argument("--model", type=Path, default=MODELS / "ggml-tiny.en.bin")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--window", type=int, default=600, help="WHISPER_WINDOW_SECONDS")
    parser.add_argument("--naive-up-to", type=int, default=3600)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model.name}, {args.threads} threads, window {args.window} s", flush=True)
    talks = {}
    for seconds in lengths:
        start = time.perf_counter()
        talks[seconds] = make_spoken_talk(CACHE, seconds)
        print(f"input {talks[seconds].name} ready ({time.perf_counter() - start:.1f} s)",
              flush=True)  # fmt: skip

    pg = PostgresServer()
    pg.start()
    dav = WebDAVServer()
    rows: list[tuple[int, Run, Run | None]] = []
    try:
        db = DatabaseFactory(pg).create()
        conn = psycopg2.connect(**db.settings.connect_kwargs("bench"))
        conn.autocommit = True
        scratch = Path(tempfile.mkdtemp(prefix="dharma-bench-"))
        env = {
            **os.environ, **db.env(), **dav.env(),
            "WHISPER_MODEL": str(args.model), "WHISPER_LANGUAGE": "en",
            "WHISPER_THREADS": str(args.threads), "WHISPER_WINDOW_SECONDS": str(args.window),
            "SCRATCH_DIR": str(scratch), "MAX_SOURCE_BYTES": str(8 * 1024**3),
            "TERMINATION_MESSAGE_PATH": str(scratch / "termination-log"), "LOG_LEVEL": "INFO",
        }  # fmt: skip
        for seconds, source in talks.items():
            upload = f"/uploads/{source.name}"
            dav.put_file(upload, source)
            ours, stderr = _run(runner_command(claimed_attempt(conn, upload)), env)
            event = _succeeded(stderr)
            ours.self_peak = int(float(str(event["peak_rss_mib"])) * MIB)
            ours.segments = int(str(event["subtitles"]))
            naive = None
            if seconds <= args.naive_up_to:
                work = scratch / "naive"
                naive, _ = _run(
                    [sys.executable, "-m", "bench.naive", str(source), str(work),
                     str(args.model), "en", str(args.threads)], env,
                )  # fmt: skip
                shutil.rmtree(work, ignore_errors=True)
            rows.append((seconds, ours, naive))
            print(f"{seconds} s: runner {ours.self_peak / MIB:.0f} MiB (tree "
                  f"{ours.tree_peak / MIB:.0f} MiB), {ours.wall:.0f} s, {ours.segments} lines;"
                  + (f" naive {naive.tree_peak / MIB:.0f} MiB, {naive.wall:.0f} s"
                     if naive else " naive not run"), flush=True)  # fmt: skip
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)
    finally:
        dav.close()
        pg.close()

    print()
    print(f"{'talk':>8}{'runner peak':>13}{'runner+ffmpeg':>15}{'runner wall':>13}"
          f"{'naive peak':>12}{'naive wall':>12}{'peak ratio':>12}{'wall ratio':>12}")  # fmt: skip
    for seconds, ours, naive in rows:
        assert ours.self_peak is not None
        line = (f"{seconds / 60:>6.0f} m{ours.self_peak / MIB:>9.0f} MiB"
                f"{ours.tree_peak / MIB:>11.0f} MiB{ours.wall:>12.0f}s")  # fmt: skip
        if naive:
            peak_ratio, wall_ratio = ours.tree_peak / naive.tree_peak, ours.wall / naive.wall
            line += (f"{naive.tree_peak / MIB:>8.0f} MiB{naive.wall:>11.0f}s"
                     f"{peak_ratio:>12.2f}{wall_ratio:>12.2f}")  # fmt: skip
        print(line)
    peaks = [ours.self_peak for _, ours, _ in rows if ours.self_peak]
    spread = (max(peaks) - min(peaks)) / min(peaks)
    verdict = "flat" if spread <= 0.10 else "NOT flat"
    print(f"\nrunner peak spread {spread:.1%} across {len(peaks)} lengths: {verdict} (<= 10%)")
    return 0 if spread <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
