"""whisper.cpp speed: the jobrunner image's OpenBLAS build against PyPI's pywhispercpp wheel.

Why: Dockerfile.worker compiles pywhispercpp from source with ggml's BLAS backend (OpenBLAS)
instead of installing PyPI's generic CPU wheel, at the price of a compiler stage and
OpenBLAS in the image. This measures what that buys, on the same audio, the same model and
the same thread count.

What runs: `measure()` below, unchanged, in two places (it loads ggml's CPU variant the way
the runner does, jobrunner/backends.py, and reports which one ran):

* the jobrunner image (`dharma-stream/jobrunner:dev-nomodel`, built by `scripts/images
  build`), through `scripts/images docker run --network none --read-only` with this file,
  the model and the audio mounted read-only;
* the test virtualenv (`$DHARMA_VENV`, default ~/.cache/dharma-stream/venv: PyPI's wheel),
  under `nice -n $DHARMA_IMAGES_NICE` (default 10), the niceness scripts/images gives its
  dockerd and so every container, so both sides compete equally with other load.

Each run is a fresh process that loads the model, transcribes the audio once to warm up, then
once more, timed: wall and CPU time (all threads) of that transcription. Runs alternate
between the two sides so a burst of outside load hits both; the report gives medians (and
min-max) of `--repeat` runs per side and the speed-up. Which ggml backend ran is read from
whisper.cpp's own log ("using BLAS backend").

Usage: python -m bench.blas [--repeat 3] [--threads 2] [--model PATH] [--audio PATH]
                            [--json PATH]
after `scripts/images build` (and `scripts/images up`, else every run starts and stops the
daemon; `scripts/images down` afterwards).

Measured (2 shared cores, jfk.wav, ggml-base.bin, 2 threads, medians of 3 and of 5 runs):
the image's OpenBLAS build 1.40 s / 1.67 s wall against 2.07 s / 2.32 s for PyPI's wheel,
i.e. 1.4-1.5x faster (CPU time 1.4x less); both transcribe the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devtools.cache import CACHE

HERE = Path(__file__).resolve()
REPO_ROOT = HERE.parents[1]
IMAGES = REPO_ROOT / "scripts" / "images"
IMAGE = "dharma-stream/jobrunner:dev-nomodel"
SHARED = Path(os.environ.get("DHARMA_SHARED", REPO_ROOT.parent / "shared"))


def measure(model_path: str, audio_path: str, threads: int) -> dict[str, Any]:
    """One process's figures (runs inside the image too: standard library, numpy and
    pywhispercpp only)."""
    import numpy as np
    from pywhispercpp.model import Model

    from jobrunner.backends import load_backends

    backends = load_backends()  # the image's CPU variants load before the model, as in the runner

    with wave.open(audio_path) as wav:
        assert wav.getframerate() == 16000 and wav.getnchannels() == 1, "16 kHz mono WAV"
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    started = time.perf_counter()
    model = Model(model_path, n_threads=threads, print_progress=False, print_realtime=False)
    load = time.perf_counter() - started
    model.transcribe(audio, language="en", n_threads=threads)  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    segments = model.transcribe(audio, language="en", n_threads=threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    from importlib import metadata

    return {
        "load_s": load,
        "wall_s": wall,
        "cpu_s": cpu,
        "audio_s": audio.size / 16000,
        "text": " ".join(s.text.strip() for s in segments),
        "nice": os.nice(0),
        "cpu_backend": backends.cpu,
        "pywhispercpp": metadata.version("pywhispercpp"),
    }


@dataclass
class Side:
    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    backends: set[str] = field(default_factory=set)

    def figure(self, key: str) -> tuple[float, float, float]:
        values = [run[key] for run in self.runs]
        return statistics.median(values), min(values), max(values)


def _run(command: list[str]) -> tuple[dict[str, Any], str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    backend = "BLAS" if "using BLAS backend" in result.stderr else "CPU"
    return figures, backend


def image_command(model: Path, audio: Path, threads: int) -> list[str]:
    return [
        str(IMAGES), "docker", "run", "--rm", "--network", "none", "--read-only",
        "-v", f"{HERE.parent}:/bench:ro",
        "-v", f"{model.parent}:/input/model:ro",
        "-v", f"{audio.parent}:/input/audio:ro",
        "--entrypoint", "python", IMAGE,
        f"/bench/{HERE.name}", "--inner",
        f"/input/model/{model.name}", f"/input/audio/{audio.name}", str(threads),
    ]  # fmt: skip


def venv_command(model: Path, audio: Path, threads: int) -> list[str]:
    venv = Path(os.environ.get("DHARMA_VENV", CACHE / "venv"))
    niceness = os.environ.get("DHARMA_IMAGES_NICE", "10")
    return [
        "nice", "-n", niceness, str(venv / "bin" / "python"), str(HERE), "--inner",
        str(model), str(audio), str(threads),
    ]  # fmt: skip


def report(sides: list[Side], args: argparse.Namespace) -> str:
    first = sides[0].runs[0]
    lines = [
        f"whisper.cpp on {args.audio.name} ({first['audio_s']:.1f} s of speech),"
        f" {args.model.name}, {args.threads} threads; median [min-max] of {args.repeat}"
        " runs each, after a warm-up transcription",
        f"{'':38} {'backend':22} {'wall s':>20} {'cpu s':>20} {'load s':>7} nice",
    ]
    for side in sides:
        wall, cpu, load = side.figure("wall_s"), side.figure("cpu_s"), side.figure("load_s")
        lines.append(
            f"{side.name:38} {'/'.join(sorted(side.backends)):22}"
            f" {wall[0]:7.2f} [{wall[1]:.2f}-{wall[2]:.2f}]"
            f" {cpu[0]:7.2f} [{cpu[1]:.2f}-{cpu[2]:.2f}] {load[0]:7.2f}"
            f" {side.runs[0]['nice']:4}"
        )
    image, venv = sides
    wall_ratio = venv.figure("wall_s")[0] / image.figure("wall_s")[0]
    cpu_ratio = venv.figure("cpu_s")[0] / image.figure("cpu_s")[0]
    lines.append(
        f"speed-up of the image's build: {wall_ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time"
    )
    for side in sides:
        lines.append(f"{side.name}: {side.runs[-1]['text']!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--inner"]:
        model, audio, threads = argv[1], argv[2], int(argv[3])
        print(json.dumps(measure(model, audio, threads)), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=SHARED / "models" / "ggml-base.bin")
    parser.add_argument("--audio", type=Path, default=SHARED / "assets" / "jfk.wav")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args(argv)
    model, audio = args.model.resolve(), args.audio.resolve()
    sides = [
        (
            Side(f"image {IMAGE.rsplit('/', maxsplit=1)[-1]} (OpenBLAS)"),
            image_command(model, audio, args.threads),
        ),
        (Side("venv (PyPI wheel)"), venv_command(model, audio, args.threads)),
    ]
    for _ in range(args.repeat):
        for side, command in sides:
            figures, backend = _run(command)
            side.runs.append(figures)
            side.backends.add(f"{backend}+{figures['cpu_backend']}")
    print(report([side for side, _ in sides], args))
    if args.json:
        raw = {side.name: {**asdict(side), "backends": sorted(side.backends)} for side, _ in sides}
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
