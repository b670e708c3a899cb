"""Tuning figures for the runner's hot path: overlap, x264 preset/threads, whisper settings.

Three tables, each backing a default in `jobrunner/settings.py` (see docs/performance.md):

1. ``overlap`` — the runner's encode + transcribe step on the 2-minute 1280x720 VP9/Opus
   input: whisper concurrent with the x264 encode (OVERLAP_VIDEO_ENCODE=true, the runner's
   first design) vs. after it (the default it chose), and with the two cores split
   differently during the overlap (whisper threads, x264 threads).
2. ``x264`` — preset x threads on a cut of the same input at HLS_BITRATE: wall, CPU, output
   size and SSIM/PSNR of the encode against the source.
3. ``whisper`` — threads and greedy vs. beam search with the real ``ggml-base.bin`` on
   looped English speech (jfk.wav): wall, CPU and word error rate against the known text.

Every variant runs in a child process (``python -m bench.tuning _one ...``) so its CPU time
is the child's user+sys from ``getrusage(RUSAGE_CHILDREN)`` — the primary figure, because the
machine is shared and wall time moves with other people's load. Each variant is repeated;
the tables give min and median, and the 1-minute load average seen around each run.
Variants are interleaved across repeats so a burst of outside load hits them evenly.

Usage:
  python -m bench.tuning overlap [--repeat 3]
  python -m bench.tuning x264 [--repeat 2] [--seconds 30]
  python -m bench.tuning whisper [--repeat 3] [--speech-seconds 55]
  python -m bench.tuning all
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.cache import BENCH_CACHE
from devtools.media import JFK, MODELS, make_long_talk

BASE_MODEL = MODELS / "ggml-base.bin"
JFK_TEXT = (
    "and so my fellow americans ask not what your country can do for you"
    " ask what you can do for your country"
)
_FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    wall: float
    cpu: float
    load: float
    extra: dict[str, Any] = field(default_factory=dict)


def _measured_child(args: list[str]) -> Run:
    """Run `python -m bench.tuning _one ...` and return its wall, CPU and JSON result."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.tuning", "_one", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {args} failed: {proc.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load = max(load, os.getloadavg()[0])
    return Run(wall, cpu, load, json.loads(proc.stdout.strip().splitlines()[-1]))


def _stats(values: Sequence[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def _header(title: str) -> None:
    cpus = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n== {title} ==  ({cpus} CPUs, load average now {load})", flush=True)


def _repeat(variants: dict[str, list[str]], repeat: int) -> dict[str, list[Run]]:
    """All variants once, then again: outside load is spread evenly over them."""
    results: dict[str, list[Run]] = {name: [] for name in variants}
    for round_ in range(repeat):
        for name, args in variants.items():
            run = _measured_child(args)
            results[name].append(run)
            print(f"  [{round_ + 1}/{repeat}] {name}: wall {run.wall:.1f} s, CPU {run.cpu:.1f} s,"
                  f" load {run.load:.2f}", flush=True)  # fmt: skip
    return results


# --------------------------------------------------------------------------- child variants


def _one_pipeline(
    source: Path, mode: str, whisper_threads: int, x264_threads: int, model: Path
) -> dict[str, Any]:
    """The runner's own steps (plan, PCM pass, encode, transcribe, package) on local files."""
    from jobrunner.ffmpeg import FFmpegProcess, run_ffmpeg
    from jobrunner.plan import EncodeOptions, Workspace, make_plan
    from jobrunner.probe import parse_probe, run_ffprobe
    from jobrunner.transcribe import WhisperCpp

    with tempfile.TemporaryDirectory(prefix="dharma-tuning-") as tmp:
        ws = Workspace(Path(tmp), source.suffix)
        ws.source.symlink_to(source)
        info = parse_probe(run_ffprobe(ws.source))
        plan = make_plan(info, ws, EncodeOptions(threads=x264_threads))
        ws.hls.mkdir()
        assert plan.pcm is not None
        timings: dict[str, float] = {}
        start = time.perf_counter()
        run_ffmpeg(plan.pcm, ws.root / "pcm.log", "extract the audio track")
        model_ = WhisperCpp(model, whisper_threads)
        t0 = time.perf_counter()
        if mode == "sequential":
            run_ffmpeg(plan.main, ws.root / "main.log", "convert the source")
            timings["encode"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            segments = model_.transcribe(ws.pcm, "en", lambda f: None, lambda: False)
            timings["transcribe"] = time.perf_counter() - t1
        else:
            main = FFmpegProcess(plan.main, ws.root / "main.log", "convert the source")
            try:
                segments = model_.transcribe(ws.pcm, "en", lambda f: None, lambda: False)
                timings["transcribe"] = time.perf_counter() - t0
                main.wait()
            except BaseException:
                main.kill()
                raise
            timings["encode"] = time.perf_counter() - t0
        timings["encode_and_transcribe"] = time.perf_counter() - t0
        run_ffmpeg(plan.package, ws.root / "package.log", "package HLS and M4A")
        timings["total"] = time.perf_counter() - start
        return {"timings": timings, "segments": len(segments)}


def _one_x264(
    source: Path, seconds: int, preset: str, threads: int, bitrate: str
) -> dict[str, Any]:
    """One encode with the runner's exact video arguments, then SSIM/PSNR (not timed)."""
    from jobrunner.plan import EncodeOptions, _video_args
    from jobrunner.probe import parse_probe, run_ffprobe

    info = parse_probe(run_ffprobe(source))
    opts = EncodeOptions(bitrate=bitrate, preset=preset, threads=threads)
    with tempfile.TemporaryDirectory(prefix="dharma-tuning-") as tmp:
        out = Path(tmp) / "video.mp4"
        cmd = [*_FF, "-t", str(seconds), "-i", str(source), "-map", "0:v:0",
               *_video_args(info, opts), "-an", "-f", "mp4", str(out)]  # fmt: skip
        start = time.perf_counter()
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True)
        usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        encode_wall = time.perf_counter() - start
        encode_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        size = out.stat().st_size
        quality = subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-i", str(out), "-t", str(seconds), "-i",
             str(source), "-lavfi", "[0:v][1:v]ssim;[0:v][1:v]psnr", "-f", "null", "-"],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    ssim = re.search(r"SSIM .*All:([0-9.]+)", quality)
    psnr = re.search(r"PSNR .*average:([0-9.inf]+)", quality)
    return {
        "encode_wall": encode_wall,
        "encode_cpu": encode_cpu,
        "bytes": size,
        "ssim": float(ssim[1]) if ssim else None,
        "psnr": float(psnr[1]) if psnr else None,
    }


def _one_whisper(pcm: Path, threads: int, beam: int, model: Path) -> dict[str, Any]:
    from jobrunner.transcribe import WhisperCpp

    start = time.perf_counter()
    whisper = WhisperCpp(model, threads, beam_size=beam)
    loaded = time.perf_counter()
    segments = whisper.transcribe(pcm, "en", lambda f: None, lambda: False)
    done = time.perf_counter()
    return {
        "load": loaded - start,
        "transcribe": done - loaded,
        "text": " ".join(s.text.strip() for s in segments),
    }


# --------------------------------------------------------------------------- tables


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words / reference words (case and punctuation ignored)."""

    def words(text: str) -> list[str]:
        return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()

    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            cur = min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
            prev, row[j] = row[j], cur
    return row[-1] / max(1, len(ref))


def _vp9_input(seconds: int) -> Path:
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    return make_long_talk(BENCH_CACHE, seconds, "1280x720", "vp9")


def table_overlap(repeat: int, model: Path) -> None:
    source = _vp9_input(120)
    cpus = len(os.sched_getaffinity(0))
    variants = {
        f"overlap, whisper {cpus} thr, x264 auto": ["pipeline", str(source), "overlap",
                                                    str(cpus), "0"],
        f"sequential, whisper {cpus} thr, x264 auto (default)": ["pipeline", str(source),
                                                                 "sequential", str(cpus), "0"],
        "overlap, whisper 1 thr, x264 auto": ["pipeline", str(source), "overlap", "1", "0"],
        f"overlap, whisper {cpus} thr, x264 1 thr": ["pipeline", str(source), "overlap",
                                                     str(cpus), "1"],
    }  # fmt: skip
    for args in variants.values():
        args.append(str(model))
    _header(f"1. encode + transcribe on {source.name}, model {model.name}")
    results = _repeat(variants, repeat)
    print(f"\n{'variant':<46}{'wall min':>9}{'wall med':>9}{'CPU min':>9}{'CPU med':>9}"
          f"{'enc+stt med':>12}{'stt med':>9}{'load':>11}")  # fmt: skip
    for name, runs in results.items():
        wmin, wmed = _stats([r.wall for r in runs])
        cmin, cmed = _stats([r.cpu for r in runs])
        both = statistics.median(r.extra["timings"]["encode_and_transcribe"] for r in runs)
        stt = statistics.median(r.extra["timings"]["transcribe"] for r in runs)
        loads = [r.load for r in runs]
        print(f"{name:<46}{wmin:>8.1f}s{wmed:>8.1f}s{cmin:>8.1f}s{cmed:>8.1f}s{both:>11.1f}s"
              f"{stt:>8.1f}s{min(loads):>5.2f}-{max(loads):<5.2f}")  # fmt: skip


def table_x264(repeat: int, seconds: int, bitrate: str, presets: list[str]) -> None:
    source = _vp9_input(120)
    cpus = len(os.sched_getaffinity(0))
    thread_counts = sorted({1, cpus})
    variants = {
        f"{preset} threads={threads}": ["x264", str(source), str(seconds), preset, str(threads),
                                        bitrate]
        for preset in presets for threads in thread_counts
    }  # fmt: skip
    _header(f"2. x264 on the first {seconds} s of {source.name} at {bitrate}")
    results = _repeat(variants, repeat)
    print(f"\n{'preset / threads':<24}{'wall min':>9}{'wall med':>9}{'CPU min':>9}{'CPU med':>9}"
          f"{'x realtime':>11}{'kbit/s':>8}{'SSIM':>8}{'PSNR dB':>9}{'load':>11}")  # fmt: skip
    for name, runs in results.items():
        wmin, wmed = _stats([r.extra["encode_wall"] for r in runs])
        cmin, cmed = _stats([r.extra["encode_cpu"] for r in runs])
        first = runs[0].extra
        kbps = first["bytes"] * 8 / seconds / 1000
        loads = [r.load for r in runs]
        print(f"{name:<24}{wmin:>8.1f}s{wmed:>8.1f}s{cmin:>8.1f}s{cmed:>8.1f}s"
              f"{seconds / wmed:>10.2f}x{kbps:>8.0f}{first['ssim']:>8.4f}{first['psnr']:>9.2f}"
              f"{min(loads):>5.2f}-{max(loads):<5.2f}")  # fmt: skip


def table_whisper(repeat: int, speech_seconds: int, model: Path) -> None:
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    pcm = BENCH_CACHE / f"speech-{speech_seconds}s.pcm"
    if not pcm.exists():
        subprocess.run(
            [*_FF, "-stream_loop", "-1", "-i", str(JFK), "-t", str(speech_seconds),
             "-ac", "1", "-ar", "16000", "-f", "s16le", str(pcm)],
            check=True,
        )  # fmt: skip
    reference = " ".join([JFK_TEXT] * round(speech_seconds / 11))
    cpus = len(os.sched_getaffinity(0))
    variants = {
        f"threads={threads} {'greedy' if beam <= 1 else f'beam={beam}'}": [
            "whisper", str(pcm), str(threads), str(beam), str(model)]
        for threads in sorted({1, cpus}) for beam in (0, 5)
    }  # fmt: skip
    _header(f"3. whisper {model.name} on {speech_seconds} s of looped jfk.wav (English)")
    results = _repeat(variants, repeat)
    print(f"\n{'variant':<20}{'wall min':>9}{'wall med':>9}{'CPU min':>9}{'CPU med':>9}"
          f"{'stt med':>9}{'x realtime':>11}{'WER':>7}{'load':>11}")  # fmt: skip
    texts = {}
    for name, runs in results.items():
        wmin, wmed = _stats([r.wall for r in runs])
        cmin, cmed = _stats([r.cpu for r in runs])
        stt = statistics.median(r.extra["transcribe"] for r in runs)
        wer = word_error_rate(reference, runs[0].extra["text"])
        texts[name] = runs[0].extra["text"]
        loads = [r.load for r in runs]
        print(f"{name:<20}{wmin:>8.1f}s{wmed:>8.1f}s{cmin:>8.1f}s{cmed:>8.1f}s{stt:>8.1f}s"
              f"{speech_seconds / stt:>10.1f}x{wer:>7.3f}"
              f"{min(loads):>5.2f}-{max(loads):<5.2f}")  # fmt: skip
    for name, text in texts.items():
        print(f"  {name}: {text[:160]}{'...' if len(text) > 160 else ''}")


# --------------------------------------------------------------------------- entry point


def _child(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "pipeline":
        source, mode, wthreads, xthreads, model = rest
        result = _one_pipeline(Path(source), mode, int(wthreads), int(xthreads), Path(model))
    elif kind == "x264":
        source, seconds, preset, threads, bitrate = rest
        result = _one_x264(Path(source), int(seconds), preset, int(threads), bitrate)
    elif kind == "whisper":
        pcm, threads, beam, model = rest
        result = _one_whisper(Path(pcm), int(threads), int(beam), Path(model))
    else:
        raise SystemExit(f"unknown variant {kind}")
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        return _child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("table", choices=["overlap", "x264", "whisper", "all"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--model", type=Path, default=BASE_MODEL)
    parser.add_argument("--seconds", type=int, default=30, help="x264 table: seconds encoded")
    parser.add_argument("--bitrate", default="2000k", help="x264 table: HLS_BITRATE")
    parser.add_argument(
        "--presets", default="ultrafast,superfast,veryfast,faster,medium", help="x264 table"
    )
    parser.add_argument("--speech-seconds", type=int, default=55, help="whisper table")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"model {args.model} not found (--model)")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"bench.tuning {args.table}: repeat {args.repeat}, python {sys.version.split()[0]},"
          f" started {started}", flush=True)  # fmt: skip
    if args.table in ("overlap", "all"):
        table_overlap(args.repeat, args.model)
    if args.table in ("x264", "all"):
        table_x264(args.repeat, args.seconds, args.bitrate, args.presets.split(","))
    if args.table in ("whisper", "all"):
        table_whisper(args.repeat, args.speech_seconds, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
