"""Benchmark: the jobrunner against the original specification's naive pipeline.

Both run in this process's run, on the same generated inputs — a 2-minute 1280x720
VP9/Opus WebM and the same content as H.264/AAC MP4 — with the same whisper engine, model
and thread count. The jobrunner runs for real (PostgreSQL, WebDAV download and upload
included), the naive pipeline on local files (which flatters the baseline). Prints wall and
CPU time (user+sys of the child processes) for each and the ratios.

In the same run it measures the limit the runner cannot beat (issue 12, item 4): its two
engines alone, each in a process of its own on the same input — x264 alone (the runner's own
encode command from `make_plan`, on local files) and whisper alone (`WhisperCpp` as the
runner sets it up, model load included, on the PCM the runner would extract). The limit ratio
is the runner's wall time over x264 + whisper for a source that must be encoded (VP9), and
over whisper alone for one that is stream-copied (H.264/AAC), where the copy runs beside
whisper; the same ratio of CPU times is printed beside it (steadier on a shared machine).
Target: <= 1.1, i.e. the pipeline around the engines costs at most 10%.

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
from devtools.cache import BENCH_CACHE
from devtools.media import MODELS, WEIGHTLESS_MODEL, make_long_talk

#: The limit ratio's target (issue 12, item 4).
LIMIT_TARGET = 1.1


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


@dataclass
class Engines:
    """The runner's two engines, each timed alone on one input (`x264` None: stream copy)."""

    x264: Measure | None
    whisper: Measure

    def limit(self) -> Measure:
        """The least the runner could take: both engines, one after the other. CPU too,
        since wall time moves with other people's load on a shared machine."""
        x264 = self.x264 or Measure(0.0, 0.0)
        return Measure(self.whisper.wall + x264.wall, self.whisper.cpu + x264.cpu)


def _engines(source: Path, model: Path, threads: int, work: Path, env: dict[str, str]) -> Engines:
    """x264 alone (the runner's `main` command, when it encodes) and whisper alone (a child
    process that loads the model and transcribes the runner's PCM), on local files."""
    from jobrunner.ffmpeg import run_ffmpeg
    from jobrunner.plan import EncodeOptions, Workspace, make_plan
    from jobrunner.probe import parse_probe, run_ffprobe

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        ws = Workspace(work, source.suffix)
        ws.source.symlink_to(source)
        plan = make_plan(parse_probe(run_ffprobe(ws.source)), ws, EncodeOptions())
        assert plan.pcm is not None
        run_ffmpeg(plan.pcm, work / "pcm.log", "extract the audio track")  # not timed
        x264 = _measured(plan.main, env) if plan.copy_video is False else None
        whisper = _measured(
            [sys.executable, "-m", "bench.pipeline", "_whisper", str(ws.pcm), str(model),
             str(threads)], env,
        )  # fmt: skip
        return Engines(x264, whisper)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _whisper_alone(pcm: Path, model: Path, threads: int) -> int:
    """What the runner's transcription step does, and nothing else: load, transcribe."""
    from jobrunner.settings import DEFAULT_PROMPTS, RunnerSettings
    from jobrunner.transcribe import WhisperCpp

    window = RunnerSettings.model_fields["WHISPER_WINDOW_SECONDS"].default
    whisper = WhisperCpp(model, threads, window_seconds=window)
    whisper.transcribe(pcm, "en", lambda _f: None, lambda: False, DEFAULT_PROMPTS.get("en", ""))
    return 0


def _default_model() -> Path:
    for name in ("ggml-base.bin", "ggml-tiny.en.bin"):
        if (MODELS / name).exists():
            return MODELS / name
    return WEIGHTLESS_MODEL


def main() -> int:
    if sys.argv[1:2] == ["_whisper"]:
        pcm, model, threads = sys.argv[2:]
        return _whisper_alone(Path(pcm), Path(model), int(threads))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--model", type=Path, default=_default_model())
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--only", choices=["vp9", "h264"], default=None)
    args = parser.parse_args()

    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    print(f"model {args.model.name}, {args.threads} threads, {os.cpu_count()} CPUs", flush=True)
    inputs = {}
    for codec in ("vp9", "h264"):
        if args.only in (None, codec):
            start = time.perf_counter()
            inputs[codec] = make_long_talk(BENCH_CACHE, args.seconds, "1280x720", codec)
            print(f"input {inputs[codec].name} ready ({time.perf_counter() - start:.1f} s)",
                  flush=True)  # fmt: skip

    rows = []
    with runner_services(args.model, args.threads, "WARNING") as services:
        for codec, source in inputs.items():
            upload = f"/uploads/{source.name}"
            services.dav.put_file(upload, source)
            for _ in range(args.repeat):
                load_before = os.getloadavg()[0]
                ours = _measured(
                    runner_command(claimed_attempt(services.conn, upload)), services.env
                )
                # Right after the runner, so both see the same outside load.
                engines = _engines(source, args.model, args.threads, services.scratch / "alone",
                                   services.env)  # fmt: skip
                work = services.scratch / "naive"
                naive = _measured(
                    [sys.executable, "-m", "bench.naive", str(source), str(work), str(args.model),
                     "en", str(args.threads)], services.env,
                )  # fmt: skip
                shutil.rmtree(work, ignore_errors=True)
                load = f"{load_before:.2f}-{os.getloadavg()[0]:.2f}"
                rows.append((codec, ours, naive, engines, load))
                x264 = f"{engines.x264.wall:.1f} s" if engines.x264 else "copy"
                print(f"{codec}: jobrunner {ours.wall:.1f} s wall / {ours.cpu:.1f} s CPU;"
                      f" naive {naive.wall:.1f} s wall / {naive.cpu:.1f} s CPU;"
                      f" ratio {ours.wall / naive.wall:.3f}; x264 alone {x264}, whisper alone"
                      f" {engines.whisper.wall:.1f} s, limit ratio"
                      f" {ours.wall / engines.limit().wall:.3f} wall,"
                      f" {ours.cpu / engines.limit().cpu:.3f} CPU; load {load}",
                      flush=True)  # fmt: skip

    targets = {"vp9": 0.5, "h264": 0.25}
    print()
    print(f"{'input':<28}{'runner wall':>12}{'runner CPU':>12}{'naive wall':>12}"
          f"{'naive CPU':>12}{'wall ratio':>12}{'CPU ratio':>11}{'target':>8}")  # fmt: skip
    for codec, ours, naive, _, _ in rows:
        label = inputs[codec].name
        print(f"{label:<28}{ours.wall:>11.1f}s{ours.cpu:>11.1f}s{naive.wall:>11.1f}s"
              f"{naive.cpu:>11.1f}s{ours.wall / naive.wall:>12.3f}{ours.cpu / naive.cpu:>11.3f}"
              f"{'<= ' + str(targets[codec]):>8}")  # fmt: skip
    print("\nlimit: the runner's wall time against its engines alone (x264 + whisper; whisper"
          " alone when the video is stream-copied)")  # fmt: skip
    print(f"{'input':<28}{'runner wall/CPU':>16}{'x264 alone':>14}{'whisper alone':>15}"
          f"{'limit wall':>11}{'limit CPU':>10}{'target':>8}{'load':>11}")  # fmt: skip
    for codec, ours, _, engines, load in rows:
        x264 = f"{engines.x264.wall:.1f}/{engines.x264.cpu:.1f}s" if engines.x264 else "copy"
        whisper = f"{engines.whisper.wall:.1f}/{engines.whisper.cpu:.1f}s"
        limit = engines.limit()
        print(f"{inputs[codec].name:<28}{f'{ours.wall:.1f}/{ours.cpu:.1f}s':>16}{x264:>14}"
              f"{whisper:>15}{ours.wall / limit.wall:>11.3f}{ours.cpu / limit.cpu:>10.3f}"
              f"{'<= ' + str(LIMIT_TARGET):>8}{load:>11}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
