"""Models, quantization and whisper.cpp options: speed, memory and accuracy (issue 12, 3 and 4).

For each variant — a model file (tiny.en and base in fp16, and their q8_0/q5_1/q5_0 files made
by `devtools.quantize` with whisper.cpp's own tool) with whisper.cpp options (flash attention,
a reduced `audio_ctx`, 1 or 2 threads) — one child process loads the model through the
runner's own `WhisperCpp` and transcribes the speech samples of `bench.accuracy --builtin`
(jfk.wav; the looped spoken talk; the espeak-ng Mandarin for multilingual models) exactly as
`bench.accuracy` does, scored by its functions (WER with jiwer; CER after script
normalisation). It prints:

- file size; load time; process RSS after the load and its peak (VmHWM) at the end;
- whisper wall and CPU seconds per audio second on the English speech (the clean speech),
  and their ratios to the same model's fp16 default (flash attention on, 2 threads);
- WER on the English samples, CER on the Mandarin one.

Why a child per variant: RSS and load time must be the variant's alone, and the CPU time is
the child's (user+sys). Variants are interleaved round by round (`--repeat`, default 2) so
outside load on this shared 2-CPU machine hits them evenly; the table gives medians and the
1-minute load average seen around each variant's runs. Missing quantized files are made
first (the tool is built once and cached, see devtools/quantize.py).

Usage:
  python -m bench.models [--repeat 2] [--variant NAME ...] [--talk-repeats 4] [--json out.json]
  python -m bench.models --list
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.media import MODELS
from devtools.quantize import MODELS_OUT, build_tool, quantize, quantized_name


@dataclass(frozen=True)
class Variant:
    """One model file with whisper.cpp options; `reference` names the variant its ratios are
    taken against (the same model in fp16 with the runner's defaults)."""

    model: str  # "tiny.en" or "base"
    qtype: str  # "f16" or a quantization type
    threads: int = 2
    flash_attn: bool = True
    audio_ctx: int = 0

    @property
    def name(self) -> str:
        extras = []
        if not self.flash_attn:
            extras.append("no flash")
        if self.audio_ctx:
            extras.append(f"audio_ctx {self.audio_ctx}")
        if self.threads != 2:
            extras.append(f"{self.threads} thr")
        return f"{self.model} {self.qtype}" + (f" ({', '.join(extras)})" if extras else "")

    @property
    def reference(self) -> str:
        return Variant(self.model, "f16").name

    def path(self) -> Path:
        fp16 = MODELS / f"ggml-{self.model}.bin"
        return fp16 if self.qtype == "f16" else MODELS_OUT / quantized_name(fp16, self.qtype)


VARIANTS = [
    *(Variant(m, q) for m in ("tiny.en", "base") for q in ("f16", "q8_0", "q5_1", "q5_0")),
    Variant("base", "f16", flash_attn=False),
    Variant("base", "f16", threads=1, flash_attn=False),
    Variant("base", "f16", audio_ctx=768),
    Variant("base", "f16", threads=1),
    Variant("base", "q5_1", flash_attn=False),
    Variant("base", "q5_1", threads=1),
    Variant("base", "q8_0", threads=1),
]


# --------------------------------------------------------------------------- child


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def _child(model: Path, threads: int, flash_attn: bool, audio_ctx: int, corpus: Path) -> int:
    """Load `model` with the options, transcribe and score the corpus; one JSON line."""
    import jiwer  # noqa: F401  (imported before the baseline RSS, like everything else)

    from bench.accuracy import evaluate_with, find_samples
    from jobrunner.transcribe import BOUNDED, WhisperCpp, check_language

    check_language("en")  # loads the bindings before the baseline
    baseline = _status_kib()["VmRSS"]
    began = time.perf_counter()
    decoding = dataclasses.replace(BOUNDED, audio_ctx=audio_ctx)
    runner = WhisperCpp(model, threads, window_seconds=300, decoding=decoding,
                        flash_attn=flash_attn)  # fmt: skip
    load_s = time.perf_counter() - began
    loaded = _status_kib()["VmRSS"]
    rows = evaluate_with(runner, find_samples(corpus, "en"), None)
    print(json.dumps({
        "load_s": load_s, "baseline_kib": baseline, "rss_kib": loaded,
        "hwm_kib": _status_kib()["VmHWM"], "rows": rows,
    }, ensure_ascii=False))  # fmt: skip
    return 0


# --------------------------------------------------------------------------- parent


@dataclass
class Run:
    load_avg: tuple[float, float]
    result: dict[str, Any]

    def speech(self) -> tuple[float, float, float]:
        """(audio s, whisper wall s, whisper CPU s) over the English (clean speech) rows."""
        rows = [r for r in self.result["rows"] if r.get("metric") == "WER"]
        return (sum(r["duration_s"] for r in rows), sum(r["wall_s"] for r in rows),
                sum(r["cpu_s"] for r in rows))  # fmt: skip

    def score(self, metric: str) -> tuple[int, int] | None:
        rows = [r for r in self.result["rows"] if r.get("metric") == metric]
        if not rows:
            return None
        return sum(r["edits"] for r in rows), sum(r["units"] for r in rows)


def _run_child(variant: Variant, corpus: Path) -> Run:
    before = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.models", "_one", str(variant.path()), str(variant.threads),
         "1" if variant.flash_attn else "0", str(variant.audio_ctx), str(corpus)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{variant.name} failed: {proc.stderr.strip()[-2000:]}")
    after = os.getloadavg()[0]
    return Run((min(before, after), max(before, after)),
               json.loads(proc.stdout.strip().splitlines()[-1]))  # fmt: skip


def _ensure_models(variants: list[Variant]) -> None:
    """Quantize what is missing (the tool is built once, see devtools/quantize.py)."""
    missing = [v for v in variants if not v.path().is_file()]
    if not missing:
        return
    tool = build_tool()
    for v in missing:
        made = quantize(tool, MODELS / f"ggml-{v.model}.bin", v.qtype, MODELS_OUT)
        print(f"made {made}", flush=True)


def _fmt_score(score: tuple[int, int] | None) -> str:
    if score is None:
        return "-"
    edits, units = score
    return f"{100 * edits / units:.1f}% ({edits}/{units})"


def _table(variants: list[Variant], runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """The medians of each variant's runs, with ratios to its model's fp16 default."""
    rows = []
    for v in variants:
        got = runs[v.name]
        speech = [r.speech() for r in got]
        rows.append({
            "variant": v.name, "reference": v.reference,
            "file_mib": v.path().stat().st_size / 2**20,
            "load_s": statistics.median(r.result["load_s"] for r in got),
            "rss_mib": statistics.median(r.result["rss_kib"] for r in got) / 1024,
            "model_mib": statistics.median(
                r.result["rss_kib"] - r.result["baseline_kib"] for r in got) / 1024,
            "peak_mib": statistics.median(r.result["hwm_kib"] for r in got) / 1024,
            "wall_per_s": statistics.median(w / a for a, w, _ in speech),
            "cpu_per_s": statistics.median(c / a for a, _, c in speech),
            "wer": [r.score("WER") for r in got], "cer": [r.score("CER") for r in got],
            "load_avg": (min(r.load_avg[0] for r in got), max(r.load_avg[1] for r in got)),
            "runs": len(got),
        })  # fmt: skip
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        ref = by_name.get(r["reference"])
        r["wall_ratio"] = r["wall_per_s"] / ref["wall_per_s"] if ref else None
        r["cpu_ratio"] = r["cpu_per_s"] / ref["cpu_per_s"] if ref else None
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'variant':<30}{'file MiB':>9}{'load s':>7}{'RSS MiB':>8}{'model MiB':>10}"
          f"{'peak MiB':>9}{'wall/s':>8}{'CPU/s':>7}{'wall x':>7}{'CPU x':>7}"
          f"  {'WER':<16}{'CER':<17}{'load':>10}")  # fmt: skip
    for r in rows:
        ratio = "" if r["wall_ratio"] is None else f"{r['wall_ratio']:>7.2f}{r['cpu_ratio']:>7.2f}"
        wers = {_fmt_score(s) for s in r["wer"]}
        cers = {_fmt_score(s) for s in r["cer"]}
        print(f"{r['variant']:<30}{r['file_mib']:>9.1f}{r['load_s']:>7.2f}{r['rss_mib']:>8.0f}"
              f"{r['model_mib']:>10.0f}{r['peak_mib']:>9.0f}{r['wall_per_s']:>8.3f}"
              f"{r['cpu_per_s']:>7.3f}{ratio:>14}  {' / '.join(sorted(wers)):<16}"
              f"{' / '.join(sorted(cers)):<17}"
              f"{r['load_avg'][0]:>5.2f}-{r['load_avg'][1]:<5.2f}")  # fmt: skip
    print("\nwall/s, CPU/s: whisper seconds per second of English speech (median of the runs);"
          " wall x, CPU x: ratio to the same model's f16 default; WER over the English samples,"
          " CER over the Mandarin one (differing runs are all shown); model MiB: RSS added by"
          " the load.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        model, threads, flash, audio_ctx, corpus = argv[1:]
        return _child(Path(model), int(threads), flash == "1", int(audio_ctx), Path(corpus))
    from bench.accuracy import build_builtin

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=2, help="rounds (medians are reported)")
    parser.add_argument("--variant", action="append", default=[], help="a name from --list")
    parser.add_argument("--talk-repeats", type=int, default=4, help="the spoken talk's length")
    parser.add_argument("--list", action="store_true", help="print the variants and stop")
    parser.add_argument("--json", type=Path, help="write the table's figures here")
    args = parser.parse_args(argv)
    names = {v.name: v for v in VARIANTS}
    if args.list:
        print("\n".join(names))
        return 0
    unknown = [n for n in args.variant if n not in names]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; see --list")
    chosen = [names[n] for n in args.variant] if args.variant else VARIANTS
    for ref in {v.reference for v in chosen} - {v.name for v in chosen}:
        chosen.insert(0, names[ref])  # ratios need the reference in the same run
    _ensure_models(chosen)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"bench.models: {len(chosen)} variants x {args.repeat} rounds, "
          f"{len(os.sched_getaffinity(0))} CPUs, started {started}, load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)  # fmt: skip
    runs: dict[str, list[Run]] = {v.name: [] for v in chosen}
    with tempfile.TemporaryDirectory(prefix="dharma-bench-models-") as corpus:
        build_builtin(Path(corpus), args.talk_repeats)
        for round_ in range(args.repeat):
            for v in chosen:
                run = _run_child(v, Path(corpus))
                runs[v.name].append(run)
                audio, wall, cpu = run.speech()
                print(f"  [{round_ + 1}/{args.repeat}] {v.name}: load {run.result['load_s']:.2f} s,"
                      f" {wall / audio:.3f} wall / {cpu / audio:.3f} CPU s per audio s,"
                      f" WER {_fmt_score(run.score('WER'))}, CER {_fmt_score(run.score('CER'))},"
                      f" load avg {run.load_avg[0]:.2f}-{run.load_avg[1]:.2f}",
                      flush=True)  # fmt: skip
    rows = _table(chosen, runs)
    print(f"\nfinished {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
