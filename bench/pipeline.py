"""Benchmark: the jobrunner against the original specification's naive pipeline.

Both run in this process's run, on the same generated inputs — a 2-minute 1280x720
VP9/Opus WebM and the same content as H.264/AAC MP4 — with the same whisper engine, model
and thread count. The jobrunner runs for real (PostgreSQL, WebDAV download and upload
included), the naive pipeline on local files (which flatters the baseline). Prints wall and
CPU time (user+sys of the child processes) for each and the ratios.

Usage: python -m bench.pipeline [--seconds 120] [--model PATH] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.runs import claimed_attempt, runner_command, runner_services
from devtools.media import MODELS, WEIGHTLESS_MODEL, make_long_talk

CACHE = Path(os.environ.get("DHARMA_CACHE", Path.home() / ".cache" / "dharma-stream")) / "bench"


@dataclass
class Measure:
    wall: float
    cpu: float


def _measured(cmd: list[str], env: dict[str, str]) -> Measure:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measure(wall, cpu)


def _default_model() -> Path:
    for name in ("ggml-base.bin", "ggml-tiny.en.bin"):
        if (MODELS / name).exists():
            return MODELS / name
    return WEIGHTLESS_MODEL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--model", type=Path, default=_default_model())
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=["vp9", "h264"], default=None)
    args = parser.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model.name}, {args.threads} threads, {os.cpu_count()} CPUs", flush=True)
    inputs = {}
    for codec in ("vp9", "h264"):
        if args.only in (None, codec):
            start = time.perf_counter()
            inputs[codec] = make_long_talk(CACHE, args.seconds, "1280x720", codec)
            print(f"input {inputs[codec].name} ready ({time.perf_counter() - start:.1f} s)",
                  flush=True)  # fmt: skip

    rows = []
    with runner_services(args.model, args.threads, "WARNING") as services:
        for codec, source in inputs.items():
            upload = f"/uploads/{source.name}"
            services.dav.put_file(upload, source)
            for _ in range(args.repeat):
                ours = _measured(
                    runner_command(claimed_attempt(services.conn, upload)), services.env
                )
                work = services.scratch / "naive"
                naive = _measured(
                    [sys.executable, "-m", "bench.naive", str(source), str(work), str(args.model),
                     "en", str(args.threads)], services.env,
                )  # fmt: skip
                shutil.rmtree(work, ignore_errors=True)
                rows.append((codec, ours, naive))
                print(f"{codec}: jobrunner {ours.wall:.1f} s wall / {ours.cpu:.1f} s CPU;"
                      f" naive {naive.wall:.1f} s wall / {naive.cpu:.1f} s CPU;"
                      f" ratio {ours.wall / naive.wall:.3f}", flush=True)  # fmt: skip

    targets = {"vp9": 0.5, "h264": 0.25}
    print()
    print(f"{'input':<28}{'runner wall':>12}{'runner CPU':>12}{'naive wall':>12}"
          f"{'naive CPU':>12}{'wall ratio':>12}{'CPU ratio':>11}{'target':>8}")  # fmt: skip
    for codec, ours, naive in rows:
        label = inputs[codec].name
        print(f"{label:<28}{ours.wall:>11.1f}s{ours.cpu:>11.1f}s{naive.wall:>11.1f}s"
              f"{naive.cpu:>11.1f}s{ours.wall / naive.wall:>12.3f}{ours.cpu / naive.cpu:>11.3f}"
              f"{'<= ' + str(targets[codec]):>8}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
