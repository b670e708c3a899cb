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
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import RssSampler
from bench.runs import RunnerServices, claimed_attempt, runner_command, runner_services
from devtools.cache import BENCH_CACHE
from devtools.log_actions import lines_with_action
from devtools.media import MODELS, make_spoken_talk
from jobrunner.settings import RunnerSettings

MIB = 2**20


@dataclass
class Run:
    wall: float
    #: Peak RSS of the process tree (wait4: the process or any of its children).
    tree_peak: int
    #: The runner's own peak RSS as it reports it (None for the naive pipeline).
    self_peak: int | None = None
    segments: int | None = None
    #: The process's RSS sampled every 100 ms: its median (the steady state; the peak is a
    #: brief spike at the start of each window, docs/performance.md section 5).
    median_rss: int | None = None


def _run(cmd: list[str], env: dict[str, str]) -> tuple[Run, str]:
    """Run `cmd`, returning wall time, wait4's peak RSS, its median sampled RSS and stderr."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        sampler = RssSampler(proc.pid, interval=0.1)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop()
        kib = [value for _, value in sampler.samples]
        median = int(statistics.median(kib)) * 1024 if kib else None
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode("utf-8", errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return Run(wall, usage.ru_maxrss * 1024, median_rss=median), stderr


def _succeeded(stderr: str) -> dict[str, object]:
    for event in lines_with_action(stderr, "run_succeeded"):
        return dict(event)
    raise SystemExit("the runner did not log its success:\n" + stderr[-3000:])


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lengths", default="900,3600,10800", help="talk lengths in seconds")
    parser.add_argument("--model", type=Path, default=MODELS / "ggml-tiny.en.bin")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--window",
        type=int,
        default=RunnerSettings.model_fields["WHISPER_WINDOW_SECONDS"].default,
        help="WHISPER_WINDOW_SECONDS (default: the runner's)",
    )
    parser.add_argument("--naive-up-to", type=int, default=3600)
    return parser.parse_args()


def _make_talks(lengths: list[int]) -> dict[int, Path]:
    """The generated talks by length (cached in BENCH_CACHE), made before any service starts so
    that their generation is not measured."""
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    talks = {}
    for seconds in lengths:
        start = time.perf_counter()
        talks[seconds] = make_spoken_talk(BENCH_CACHE, seconds)
        print(f"input {talks[seconds].name} ready ({time.perf_counter() - start:.1f} s)",
              flush=True)  # fmt: skip
    return talks


def _run_ours(services: RunnerServices, source: Path) -> Run:
    """The real jobrunner on `source` (uploaded first), with the peak RSS and the number of
    subtitle lines it logs on success."""
    upload = f"/uploads/{source.name}"
    services.dav.put_file(upload, source)
    ours, stderr = _run(runner_command(claimed_attempt(services.conn, upload)), services.env)
    event = _succeeded(stderr)
    ours.self_peak = int(float(str(event["peak_rss_mib"])) * MIB)
    ours.segments = int(str(event["subtitles"]))
    return ours


def _run_naive(services: RunnerServices, source: Path, args: argparse.Namespace) -> Run:
    """The baseline (bench/naive.py) on the local file, its work directory removed after."""
    work = services.scratch / "naive"
    naive, _ = _run(
        [sys.executable, "-m", "bench.naive", str(source), str(work),
         str(args.model), "en", str(args.threads)], services.env,
    )  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return naive


def _measure_all(
    talks: dict[int, Path], args: argparse.Namespace
) -> list[tuple[int, Run, Run | None]]:
    """Each talk through the runner, and through the naive pipeline up to --naive-up-to,
    with the services running for the whole series; a line per talk as it finishes."""
    rows: list[tuple[int, Run, Run | None]] = []
    own_env = {
        "WHISPER_WINDOW_SECONDS": str(args.window), "MAX_SOURCE_BYTES": str(8 * 1024**3),
    }  # fmt: skip
    with runner_services(args.model, args.threads, "INFO", own_env) as services:
        for seconds, source in talks.items():
            ours = _run_ours(services, source)
            naive = _run_naive(services, source, args) if seconds <= args.naive_up_to else None
            rows.append((seconds, ours, naive))
            _print_progress(seconds, ours, naive)
    return rows


def _print_progress(seconds: int, ours: Run, naive: Run | None) -> None:
    """One talk's figures as soon as they are known (the whole series takes hours)."""
    assert ours.self_peak is not None
    median = f", median {ours.median_rss / MIB:.0f} MiB" if ours.median_rss else ""
    print(f"{seconds} s: runner {ours.self_peak / MIB:.0f} MiB{median} (tree "
          f"{ours.tree_peak / MIB:.0f} MiB), {ours.wall:.0f} s, {ours.segments} lines;"
          + (f" naive {naive.tree_peak / MIB:.0f} MiB, {naive.wall:.0f} s"
             if naive else " naive not run"), flush=True)  # fmt: skip


def _report(rows: list[tuple[int, Run, Run | None]]) -> bool:
    """Print the table and the verdict: is the runner's own peak flat (within 10%)?"""
    print()
    print(f"{'talk':>8}{'runner peak':>13}{'median':>10}{'runner+ffmpeg':>15}{'runner wall':>13}"
          f"{'naive peak':>12}{'naive wall':>12}{'peak ratio':>12}{'wall ratio':>12}")  # fmt: skip
    for seconds, ours, naive in rows:
        assert ours.self_peak is not None
        median = f"{ours.median_rss / MIB:>6.0f} MiB" if ours.median_rss else f"{'-':>10}"
        line = (f"{seconds / 60:>6.0f} m{ours.self_peak / MIB:>9.0f} MiB{median}"
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
    return spread <= 0.10


def main() -> int:
    args = _parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"model {args.model.name}, {args.threads} threads, window {args.window} s", flush=True)
    talks = _make_talks(lengths)
    rows = _measure_all(talks, args)
    return 0 if _report(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
