"""Hard audio: whisper's time on music, noise, bells, chanting and synthetic voices, next to
clean speech (issue 12, item 2).

Every case of the generated corpus (`devtools.hardaudio`) goes through the runner's own
`WhisperCpp` (windows, silence gate and all) with each decoding variant, interleaved case by
case in one process and one run, so the ratios compare like with like on a shared machine.
Per case and variant it prints:

- `RTF`: transcription wall seconds / audio seconds;
- `CPU s`: this process's user+sys during the transcription (whisper's threads included);
- `segs`: segments whisper returned, and `kept` what of them the runner's cleaning
  (`clean_segments`: bracketed notes, loops) leaves for the subtitle rows;
- `x clean`: the case's median RTF over the clean-speech median RTF of the same variant in
  the same pass (`--repeat N` interleaved rounds); the target is every case <= 3;
- the start of the text.

`--stress N` repeats the pass with N busy processes competing for the CPUs (a pod at its CPU
limit on a busy node: whisper's spinning threads lose most when descheduled). A run longer
than `--cap` seconds is stopped through whisper's abort callback and shown as `>cap`.

Usage:
  python -m bench.hardaudio [--model PATH] [--threads 2] [--variant before] [--variant after]
                            [--case NAME]... [--stress 2] [--stress-case NAME]... [--cap 240]
                            [--repeat N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.accuracy import markdown_table, whisper_arguments
from devtools.cache import BENCH_CACHE
from devtools.hardaudio import BY_NAME, CASES, make_case, to_pcm
from jobrunner.settings import DEFAULT_PROMPTS
from jobrunner.subtitles import clean_segments
from jobrunner.transcribe import BOUNDED, WHISPER_DEFAULTS, Decoding, WhisperCpp

#: "before" is whisper.cpp's defaults (the runner until issue 12), "after" the runner's
#: choice; the others are the candidates that were measured to choose it.
VARIANTS: dict[str, Decoding] = {
    "before": WHISPER_DEFAULTS,
    "after": BOUNDED,
    "no-fallback": Decoding(temperature_inc=0.0),
    "best_of-1": Decoding(best_of=1),
    "best_of-2-inc-0.4": Decoding(best_of=2, temperature_inc=0.4),
    "best_of-1-inc-0.4": Decoding(best_of=1, temperature_inc=0.4),
    "suppress-nst": Decoding(suppress_nst=True),
    "max-tokens-64": Decoding(max_tokens=64),
    # whisper.cpp drops a frame as "no speech" when no_speech_prob > no_speech_thold and the
    # average log-probability < logprob_thold: looser thresholds, against the hallucinations.
    "no-speech-0.2": Decoding(temperature_inc=0.0, no_speech_thold=0.2),
    "logprob-0.5": Decoding(temperature_inc=0.0, logprob_thold=-0.5),
    "no-speech-0.2-logprob-0.5": Decoding(
        temperature_inc=0.0, no_speech_thold=0.2, logprob_thold=-0.5
    ),
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load() -> float:
    return os.getloadavg()[0]


class _Busy:
    """N processes spinning on the CPU (each a plain Python loop), stopped by their pids."""

    def __init__(self, count: int) -> None:
        self._procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)
        ]

    def __enter__(self) -> _Busy:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()


def transcribe_once(model: WhisperCpp, pcm: Path, language: str, cap: float) -> dict[str, Any]:
    """One transcription: wall, CPU, segments and text; stopped after `cap` seconds."""
    started = time.monotonic()
    cpu = _cpu()
    segments = model.transcribe(
        pcm, language, lambda _f: None, lambda: time.monotonic() - started > cap,
        prompt=DEFAULT_PROMPTS.get(language, ""),
    )  # fmt: skip
    wall = time.monotonic() - started
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(_cpu() - cpu, 2),
        "segments": len(segments),
        "capped": wall > cap,
        "text": " ".join(s.text.strip() for s in segments),
        # what would become subtitle rows: after the runner's own cleaning
        "kept": " | ".join(s.text for s in clean_segments(segments)),
    }


def run_pass(
    model: WhisperCpp, cases: list[str], variants: list[str], opts: argparse.Namespace, busy: int
) -> list[dict[str, Any]]:
    """Every case with every variant, interleaved, `opts.repeat` rounds, with `busy`
    competing processes."""
    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    pcms = {}
    for name in cases:
        wav = make_case(name, BENCH_CACHE / "hardaudio")
        pcms[name] = (wav.with_suffix(".pcm"), to_pcm(wav, wav.with_suffix(".pcm")))
    rows: list[dict[str, Any]] = []
    with _Busy(busy):
        for number in range(opts.repeat):
            for name in cases:
                pcm, seconds = pcms[name]
                for variant in variants:
                    model.decoding = VARIANTS[variant]
                    row: dict[str, Any] = {
                        "case": name, "language": BY_NAME[name].language, "variant": variant,
                        "busy": busy, "round": number, "audio_s": round(seconds, 1),
                        "load": round(_load(), 2),
                    }  # fmt: skip
                    row |= transcribe_once(model, pcm, BY_NAME[name].language, opts.cap)
                    row["rtf"] = round(row["wall_s"] / seconds, 3)
                    rows.append(row)
                    print(json.dumps(row, ensure_ascii=False), flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (busy, case, variant): medians over the rounds, and the ratio of the
    median RTF to the median clean-speech RTF of the same variant under the same load."""
    groups: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["busy"], row["case"], row["variant"]), []).append(row)
    out = []
    for (busy, case, variant), runs in groups.items():
        out.append({
            "case": case, "language": runs[0]["language"], "variant": variant, "busy": busy,
            "audio_s": runs[0]["audio_s"], "runs": len(runs),
            "wall_s": round(statistics.median(r["wall_s"] for r in runs), 2),
            "rtf": round(statistics.median(r["rtf"] for r in runs), 3),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
            "segments": max(r["segments"] for r in runs),
            "capped": any(r["capped"] for r in runs),
            "load": f"{min(r['load'] for r in runs):.1f}-{max(r['load'] for r in runs):.1f}",
            "text": runs[0]["text"],
            "kept": runs[0]["kept"],
        })  # fmt: skip
    clean = {(r["busy"], r["variant"]): r["rtf"] for r in out if r["case"] == "clean_speech"}
    for row in out:
        base = clean.get((row["busy"], row["variant"]))
        row["x_clean"] = round(row["rtf"] / base, 2) if base else None
    return out


def table(rows: list[dict[str, Any]], cap: float) -> str:
    header = ["case", "lang", "audio s", "busy", "variant", "wall s", "RTF", "CPU s", "segs",
              "x clean", "load", "text (start)", "kept (start)"]  # fmt: skip
    return markdown_table(header, [
        (r["case"], r["language"], r["audio_s"], r["busy"], r["variant"],
         f">{cap:g}" if r["capped"] else r["wall_s"], r["rtf"], r["cpu_s"], r["segments"],
         "" if r["x_clean"] is None else r["x_clean"], r["load"],
         r["text"][:30].replace("|", "/"), r["kept"][:30].replace("|", "/") or "(none)")
        for r in rows
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = whisper_arguments(__doc__)
    parser.add_argument(
        "--variant", action="append", choices=list(VARIANTS), default=[],
        help="decoding variants (repeatable; default: before and after)",
    )  # fmt: skip
    parser.add_argument(
        "--case", action="append", choices=list(BY_NAME), default=[],
        help="cases (repeatable; default: all; clean_speech is always run)",
    )  # fmt: skip
    parser.add_argument("--stress", type=int, default=0, help="busy processes for a second pass")
    parser.add_argument(
        "--stress-case", action="append", choices=list(BY_NAME), default=[],
        help="cases of the stressed pass (default: the same cases)",
    )  # fmt: skip
    parser.add_argument("--cap", type=float, default=240.0, help="stop a run after this long")
    args = parser.parse_args(argv)
    variants = args.variant or ["before", "after"]
    cases = ["clean_speech", *[c for c in args.case or [c.name for c in CASES]
                               if c != "clean_speech"]]  # fmt: skip
    print(f"model {args.model}, threads {args.threads}, load {_load():.2f}; variants:")
    for name in variants:
        print(f"  {name}: {asdict(VARIANTS[name])}")
    model = WhisperCpp(args.model, args.threads, window_seconds=300)
    rows = run_pass(model, cases, variants, args, 0)
    if args.stress:
        stressed = ["clean_speech", *[c for c in args.stress_case or cases if c != "clean_speech"]]
        rows += run_pass(model, stressed, variants, args, args.stress)
    summary = summarise(rows)
    if args.json:
        args.json.write_text(
            json.dumps({"runs": rows, "summary": summary}, ensure_ascii=False, indent=1)
        )
    print()
    print(table(summary, args.cap))


if __name__ == "__main__":
    main()
