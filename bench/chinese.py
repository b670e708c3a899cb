"""Chinese script and prompts: what whisper's initial prompt does to its Mandarin output.

Mandarin speech is generated with espeak-ng (`devtools.media.make_mandarin_speech`: known
Simplified sentences) and transcribed by the runner's own `WhisperCpp` with the real
multilingual model and language `zh`, once per prompt variant. For each variant the table
gives:

- `trad %`: the share of the output's Han characters that OpenCC's t2s changes, i.e. that
  are written in Traditional (0: all Simplified or common to both scripts);
- `simp %`: the share that s2t changes (written in Simplified);
- `punct`: full-width punctuation marks (，。？！、：；) / ASCII ones (,.?!:;) in the output;
- `CER`: character error rate against the spoken sentences, both in Simplified and without
  punctuation (does the prompt cost accuracy?);
- wall and CPU seconds of the transcription (CPU: this process's user+sys, whisper's threads
  included; the machine is shared, so CPU is the steadier figure).

Usage:
  python -m bench.chinese [--model PATH] [--threads 2] [--repeat 1] [--variant NAME]...
                          [--json out.json]
"""

from __future__ import annotations

import json
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.accuracy import markdown_table, whisper_arguments
from devtools.cache import BENCH_CACHE
from devtools.media import MANDARIN_SENTENCES, make_mandarin_speech
from jobrunner.script import Script, converter, han_share_changed
from jobrunner.settings import DEFAULT_PROMPTS

#: name -> prompt. The default is the runner's (jobrunner/settings.py DEFAULT_PROMPTS).
VARIANTS = {
    "none": "",
    "default (Simplified, ，。)": DEFAULT_PROMPTS["zh"],
    "Traditional, ，。": "以下是普通話的句子，使用繁體中文和標點符號。",
    "Simplified, no punctuation": "以下是普通话的句子",
    "Simplified, ，。？ in use": "大家好。今天，我们一起学习佛法，好吗？请认真听。",
}
_FULL = set("，。？！、：；")
_ASCII = set(",.?!:;")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _distance(a: str, b: str) -> int:
    """Levenshtein distance between two strings (characters)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _bare(text: str) -> str:
    """Simplified, without punctuation or spaces: what CER compares."""
    simplified = converter(Script.SIMPLIFIED)(text)
    return "".join(c for c in simplified if c.isalnum())


def measure(text: str, reference: str) -> dict[str, Any]:
    han, trad = han_share_changed(text, Script.SIMPLIFIED)
    _, simp = han_share_changed(text, Script.TRADITIONAL)
    ref = _bare(reference)
    return {
        "han": han,
        "trad_pct": round(100 * trad / han, 1) if han else 0.0,
        "simp_pct": round(100 * simp / han, 1) if han else 0.0,
        "full_width": sum(c in _FULL for c in text),
        "ascii": sum(c in _ASCII for c in text),
        "cer": round(_distance(_bare(text), ref) / len(ref), 3),
    }


def run(model_path: Path, threads: int, repeat: int, names: list[str]) -> list[dict[str, Any]]:
    from jobrunner.transcribe import WhisperCpp

    BENCH_CACHE.mkdir(parents=True, exist_ok=True)
    wav = make_mandarin_speech(BENCH_CACHE)
    pcm = wav.with_suffix(".pcm")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-f", "s16le",
         "-ar", "16000", "-ac", "1", str(pcm)],
        check=True,
    )  # fmt: skip
    seconds = pcm.stat().st_size / 32000
    model = WhisperCpp(model_path, threads)
    reference = "".join(MANDARIN_SENTENCES)
    rows = []
    for number in range(repeat):
        for name in names:
            prompt = VARIANTS[name]
            wall, cpu = time.monotonic(), _cpu()
            segments = model.transcribe(pcm, "zh", lambda f: None, lambda: False, prompt=prompt)
            wall, cpu = time.monotonic() - wall, _cpu() - cpu
            text = "".join(s.text.strip() for s in segments)
            rows.append({
                "variant": name, "prompt": prompt, "run": number, "audio_s": round(seconds, 1),
                "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "text": text,
                **measure(text, reference),
            })  # fmt: skip
            print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = ["prompt", "trad %", "simp %", "punct full/ASCII", "CER", "wall s", "CPU s",
              "output (start)"]  # fmt: skip
    return markdown_table(header, [
        (r["variant"], r["trad_pct"], r["simp_pct"], f"{r['full_width']}/{r['ascii']}",
         r["cer"], r["wall_s"], r["cpu_s"], r["text"][:24])
        for r in rows
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = whisper_arguments(__doc__)
    parser.add_argument(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        default=[],
        help="only these prompt variants (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    rows = run(args.model, args.threads, args.repeat, args.variant or list(VARIANTS))
    if args.json:
        args.json.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    print(f"\nspoken: {''.join(MANDARIN_SENTENCES)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
