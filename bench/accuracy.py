"""Transcript accuracy: WER (English) / CER (Chinese) of the runner's transcripts (issue 12).

For a directory of audio files (any format FFmpeg reads), each with its reference transcript
beside it as `<stem>.txt` (UTF-8) and optionally its language as `<stem>.lang` (else
`--language`), every file is converted to 16 kHz mono s16le with FFmpeg and transcribed by
the runner's own `WhisperCpp` (windows, silence handling and all), then cleaned and put in
the job's script exactly as the runner does before writing subtitles (`clean_segments`,
`convert_segments`). The prompt is the runner's default for the language
(WHISPER_PROMPTS' default) unless `--prompt` is given.

Scoring (with `jiwer`):
- English (and any language not written in Chinese characters): WER over words, both sides
  lowercased, punctuation stripped, whitespace collapsed (`normalise_words`);
- Chinese (`zh`, `yue`): CER over characters, both sides converted to Simplified with OpenCC
  t2s (jobrunner/script.py), punctuation (ASCII and full-width) and whitespace removed
  (`normalise_chinese`).

Per file: duration, real-time factor (transcription wall time / duration), the rate with
its edits / reference units, and the hypothesis. Totals are corpus-level: total edits over
total reference units, per metric, not a mean of the files' rates.

`--builtin` scores the speech samples available here (assembled into a temporary
directory): jfk.wav (en), a looped spoken talk (`make_spoken_talk`: jfk.wav every 12.5 s,
en) and espeak-ng Mandarin (`make_mandarin_speech`, zh). Files in a language an
English-only model (`*.en.bin`) cannot transcribe are skipped.

Usage:
  python -m bench.accuracy DIRECTORY [--language en] [--model PATH] [--threads N]
                           [--window SECONDS] [--beam-size N] [--prompt TEXT] [--json out.json]
  python -m bench.accuracy --builtin [--talk-repeats 10] [--model PATH] ...
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from devtools.media import JFK, MANDARIN_SENTENCES, MODELS, make_mandarin_speech, make_spoken_talk
from jobrunner.script import CHINESE, Script, convert_segments, converter, parse_language
from jobrunner.settings import DEFAULT_PROMPTS, available_cpus
from jobrunner.subtitles import clean_segments
from jobrunner.transcribe import WhisperCpp, check_language

#: What jfk.wav says.
JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
#: `make_spoken_talk`'s default period: jfk.wav (11 s) then silence, every 12.5 s.
TALK_PERIOD = 12.5
_FF = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
_REFERENCE_SUFFIXES = {".txt", ".lang", ".json", ".md"}
_APOSTROPHES = re.compile(r"(?<=\w)['\u2019](?=\w)")

# --------------------------------------------------------------------------- scoring


def _is_punctuation(char: str) -> bool:
    """Unicode punctuation or symbol: ASCII ,.?!-" and full-width ，。？！、：；「」 alike."""
    return unicodedata.category(char)[0] in "PS"


def normalise_words(text: str) -> str:
    """English for WER: lowercase, punctuation stripped (apostrophes inside a word are
    dropped, "don't" -> "dont"; any other mark separates words), whitespace collapsed."""
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join("".join(" " if _is_punctuation(c) else c for c in text).split())


def normalise_chinese(text: str) -> str:
    """Chinese for CER: Simplified (OpenCC t2s), without punctuation (ASCII or full-width)
    or whitespace, Latin letters lowercased; one character is one unit."""
    simplified = converter(Script.SIMPLIFIED)(unicodedata.normalize("NFKC", text))
    return "".join(c for c in simplified.casefold() if not (c.isspace() or _is_punctuation(c)))


@dataclass(frozen=True)
class Score:
    """Edits (substitutions + deletions + insertions) against `units` reference units."""

    metric: str  # "WER" or "CER"
    edits: int
    units: int

    @property
    def rate(self) -> float:
        return self.edits / self.units if self.units else float("nan")


def metric_for(language: str) -> str:
    """CER for languages written in Chinese characters, WER otherwise."""
    return "CER" if parse_language(language).whisper in CHINESE else "WER"


def score(reference: str, hypothesis: str, language: str) -> Score:
    """The hypothesis against the reference, both normalised for `language`."""
    import jiwer

    metric = metric_for(language)
    if metric == "CER":
        ref, hyp = normalise_chinese(reference), normalise_chinese(hypothesis)
    else:
        ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    if not ref:
        raise ValueError("the reference is empty after normalisation")
    if metric == "CER":
        out: Any = jiwer.process_characters(ref, hyp)
    else:
        out = jiwer.process_words(ref, hyp)
    return Score(
        metric,
        out.substitutions + out.deletions + out.insertions,
        out.substitutions + out.deletions + out.hits,
    )


def corpus(scores: Iterable[Score]) -> dict[str, Score]:
    """Per metric: total edits over total reference units (not a mean of rates)."""
    totals: dict[str, Score] = {}
    for s in scores:
        t = totals.get(s.metric, Score(s.metric, 0, 0))
        totals[s.metric] = Score(s.metric, t.edits + s.edits, t.units + s.units)
    return totals


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Sample:
    audio: Path
    reference: str
    language: str


def find_samples(directory: Path, default_language: str) -> list[Sample]:
    """Every audio file in `directory` with a `<stem>.txt` beside it, in name order; its
    language is `<stem>.lang` if present, else `default_language`."""
    samples = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() in _REFERENCE_SUFFIXES:
            continue
        text = path.with_suffix(".txt")
        if not text.is_file():
            print(f"skipped {path.name}: no {text.name}", file=sys.stderr)
            continue
        lang = path.with_suffix(".lang")
        language = lang.read_text().strip() if lang.is_file() else default_language
        samples.append(Sample(path, text.read_text(encoding="utf-8"), language))
    return samples


def spoken_talk_reference(repeats: int) -> str:
    """What `make_spoken_talk(dir, repeats * TALK_PERIOD)` says: JFK's sentence, `repeats`
    times (its last unit ends in silence, so no sentence is cut)."""
    return " ".join([JFK_TEXT] * repeats)


def build_builtin(directory: Path, talk_repeats: int) -> None:
    """The speech samples available here, with their references and languages."""
    import shutil

    def add(stem: str, audio: Path, text: str, language: str) -> None:
        target = directory / f"{stem}{audio.suffix}"
        if audio.parent == directory:
            audio.rename(target)
        else:
            shutil.copy(audio, target)
        (directory / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        (directory / f"{stem}.lang").write_text(language + "\n")

    add("jfk", JFK, JFK_TEXT, "en")
    # Whole seconds: rounding 12.5 s periods down only trims the last unit's silence.
    talk = make_spoken_talk(directory, int(talk_repeats * TALK_PERIOD), TALK_PERIOD)
    add(f"spoken-talk-{talk_repeats}x", talk, spoken_talk_reference(talk_repeats), "en")
    add("mandarin-espeak", make_mandarin_speech(directory), "".join(MANDARIN_SENTENCES), "zh")


# --------------------------------------------------------------------------- running


def to_pcm(audio: Path, pcm: Path) -> float:
    """The first audio stream as 16 kHz mono s16le (as the runner extracts it); seconds."""
    subprocess.run(
        [*_FF, "-i", str(audio), "-map", "0:a:0", "-vn", "-sn", "-dn", "-ac", "1", "-ar",
         "16000", "-c:a", "pcm_s16le", "-f", "s16le", str(pcm)],
        check=True, capture_output=True,
    )  # fmt: skip
    return pcm.stat().st_size / 32000


def _multilingual(runner: WhisperCpp) -> bool:
    import _pywhispercpp as pw

    return bool(pw.whisper_is_multilingual(runner._model._ctx))


def evaluate(
    samples: list[Sample],
    model: Path,
    threads: int,
    window: int,
    beam_size: int,
    prompt: str | None,
) -> list[dict[str, Any]]:
    """Transcribe and score every sample; one row per sample (skipped ones say why)."""
    started = time.monotonic()
    runner = WhisperCpp(model, threads, beam_size=beam_size, window_seconds=window)
    print(f"model {model.name} loaded in {time.monotonic() - started:.1f} s", flush=True)
    return evaluate_with(runner, samples, prompt)


def evaluate_with(
    runner: WhisperCpp, samples: list[Sample], prompt: str | None
) -> list[dict[str, Any]]:
    """`evaluate` with a model already loaded: bench/models.py loads each variant its own
    way (quantized file, flash attention, audio context) and scores it with this same code.
    Each row also has `cpu_s`, this process's CPU time (user+sys) while whisper ran."""
    multilingual = _multilingual(runner)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="accuracy-") as scratch:
        pcm = Path(scratch) / "audio.pcm"
        for sample in samples:
            chosen = parse_language(sample.language)
            language = check_language(chosen.whisper)
            row: dict[str, Any] = {"file": sample.audio.name, "language": sample.language}
            rows.append(row)
            if not multilingual and language != "en":
                row["skipped"] = "English-only model"
                print(_line(row), flush=True)
                continue
            duration = to_pcm(sample.audio, pcm)
            text_prompt = DEFAULT_PROMPTS.get(language, "") if prompt is None else prompt
            begun, cpu_before = time.monotonic(), _cpu_seconds()
            segments = runner.transcribe(
                pcm, language, lambda _f: None, lambda: False, prompt=text_prompt
            )
            wall, cpu = time.monotonic() - begun, _cpu_seconds() - cpu_before
            script = chosen.script_for(Script.SIMPLIFIED)
            cleaned = convert_segments(
                clean_segments(segments, int(duration * 1000)), script, language
            )
            joiner = "" if language in CHINESE else " "
            hypothesis = joiner.join(s.text for s in cleaned)
            result = score(sample.reference, hypothesis, sample.language)
            row.update(
                duration_s=round(duration, 2),
                wall_s=round(wall, 2),
                cpu_s=round(cpu, 2),
                rtf=round(wall / duration, 3) if duration else None,
                metric=result.metric,
                edits=result.edits,
                units=result.units,
                rate=round(result.rate, 4),
                hypothesis=hypothesis,
            )
            print(_line(row), flush=True)
    return rows


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _line(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{row['file']} [{row['language']}]: skipped ({row['skipped']})"
    return (
        f"{row['file']} [{row['language']}]: {row['duration_s']:.1f} s, RTF {row['rtf']:.3f}, "
        f"{row['metric']} {100 * row['rate']:.1f}% ({row['edits']}/{row['units']})\n"
        f"    hyp: {row['hypothesis']}"
    )


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if "metric" in r]
    out: dict[str, Any] = {
        name: asdict(s) | {"rate": round(s.rate, 4)}
        for name, s in corpus(Score(r["metric"], r["edits"], r["units"]) for r in scored).items()
    }
    seconds = sum(r["duration_s"] for r in scored)
    if seconds:
        out["rtf"] = round(sum(r["wall_s"] for r in scored) / seconds, 3)
        out["duration_s"] = round(seconds, 2)
    return out


def whisper_arguments(description: str | None, threads: int = 2) -> argparse.ArgumentParser:
    """A parser with the options every whisper benchmark takes: `--model` (the test copy of
    ggml-base.bin), `--threads`, `--repeat` (rounds) and `--json` (where the rows go)."""
    parser = argparse.ArgumentParser(description=(description or "").split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=MODELS / "ggml-base.bin")
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--repeat", type=int, default=1, help="rounds (medians are shown)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    return parser


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The rows as a Markdown table, as the whisper benchmarks print them for
    docs/performance.md (cells are written as given: escape a `|` before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("directory", nargs="?", type=Path, help="audio files with <stem>.txt")
    where.add_argument("--builtin", action="store_true", help="the speech samples here")
    parser.add_argument("--language", default="en", help="for files without <stem>.lang")
    parser.add_argument("--model", type=Path, default=MODELS / "ggml-base.bin")
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--window", type=int, default=300, help="WHISPER_WINDOW_SECONDS")
    parser.add_argument("--beam-size", type=int, default=0, help="WHISPER_BEAM_SIZE")
    parser.add_argument("--prompt", help="initial prompt (default: the runner's per language)")
    parser.add_argument("--talk-repeats", type=int, default=10, help="--builtin: talk length")
    parser.add_argument("--json", type=Path, help="write the rows and totals here")
    args = parser.parse_args(argv)
    print(
        f"model {args.model}, threads {args.threads}, window {args.window} s, "
        f"beam size {args.beam_size}, prompt {'default' if args.prompt is None else 'given'}"
    )
    with tempfile.TemporaryDirectory(prefix="accuracy-corpus-") as built:
        directory = args.directory
        if args.builtin:
            directory = Path(built)
            build_builtin(directory, args.talk_repeats)
        samples = find_samples(directory, args.language)
        if not samples:
            parser.error(f"no audio with a reference transcript in {directory}")
        rows = evaluate(samples, args.model, args.threads, args.window, args.beam_size, args.prompt)
    summary = totals(rows)
    print("\ntotal (corpus level: all edits / all reference units):")
    for metric in ("WER", "CER"):
        if metric in summary:
            t = summary[metric]
            print(f"  {metric} {100 * t['rate']:.1f}% ({t['edits']}/{t['units']})")
    if "rtf" in summary:
        print(f"  RTF {summary['rtf']:.3f} over {summary['duration_s']:.1f} s of audio")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "totals": summary}, ensure_ascii=False, indent=1)
        )


if __name__ == "__main__":
    main()
