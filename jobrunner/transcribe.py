"""Speech to text with whisper.cpp through the `pywhispercpp` bindings.

Why the bindings and not the CLI: the model loads once per process, PCM goes in as an array
(whisper.cpp cannot read AAC — DESIGN.md defect 2), segments arrive through a callback (our
progress), and an abort callback lets a cancelled or fenced-out attempt stop in seconds. The
production image builds the same bindings from source with OpenBLAS and one CPU library per
instruction-set level, the node's best loaded at run time (Dockerfile.worker, backends.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jobrunner.backends import load_backends
from jobrunner.errors import PermanentError, RunnerError, ToolError
from jobrunner.subtitles import Segment, decode_segments
from jobrunner.windows import FRAME_MS, FRAME_SAMPLES, Cuts, Window, plan_windows, to_talk_time

log = logging.getLogger(__name__)

#: whisper.cpp timestamps are in centiseconds.
_TICK_MS = 10
#: Loudness is measured over 100 ms windows.
_WINDOW = FRAME_SAMPLES
#: A window quieter than this is silence. Digital silence is -inf; the room tone of a quiet
#: hall is around -60 dBFS and speech -35 to -10 dBFS, so nothing a person can hear as speech
#: is below it. Whisper invents text on silence (with `zh` on 20 s of digital silence, the
#: base model wrote one line and then another nine times), so a segment whose every window
#: is silent is dropped, and audio that is silent throughout is not transcribed at all.
SILENCE_DBFS = -60.0


@dataclass(frozen=True)
class Decoding:
    """whisper.cpp's decoding knobs that decide how much work a hard window costs; the
    defaults are whisper.cpp's own. When a window's decode fails its checks (average
    log-probability below `logprob_thold`, or text so repetitive that its entropy is below
    `entropy_thold`), whisper.cpp decodes it again at a temperature `temperature_inc` higher,
    with `best_of` candidates, up to temperature 1.0: with the defaults, up to 25 more
    decodes of the window. `max_tokens` caps the tokens of one segment (0: no cap) and
    `suppress_nst` forbids non-speech tokens (music notes, [MUSIC] and the like)."""

    temperature_inc: float = 0.2
    best_of: int = 5
    entropy_thold: float = 2.4
    logprob_thold: float = -1.0
    no_speech_thold: float = 0.6
    max_tokens: int = 0
    suppress_nst: bool = False
    #: The encoder's context in 20 ms steps (0: whisper's full 1500, a 30 s frame). Smaller is
    #: faster but shows whisper only the start of each frame (bench/models.py measures it).
    audio_ctx: int = 0

    def params(self) -> dict[str, Any]:
        """As keyword arguments of pywhispercpp's `Model.transcribe`."""
        return {
            "temperature_inc": self.temperature_inc,
            "greedy": {"best_of": self.best_of},
            "entropy_thold": self.entropy_thold,
            "logprob_thold": self.logprob_thold,
            "no_speech_thold": self.no_speech_thold,
            "max_tokens": self.max_tokens,
            "suppress_nst": self.suppress_nst,
            "audio_ctx": self.audio_ctx,
        }


#: whisper.cpp's defaults: what the runner used before issue 12 ("before" in bench/hardaudio.py).
WHISPER_DEFAULTS = Decoding()
#: The runner's choice, by measurement (docs/performance.md, "Hard audio"): no temperature
#: fallback, so every 30 s frame is decoded once whatever the audio. On music, noise, bells
#: and synthetic voices the fallback changed little in the text but multiplied the time,
#: most under CPU pressure; on clean speech it changed nothing (same text, WER unchanged).
BOUNDED = Decoding(temperature_inc=0.0)
#: whisper.cpp's flash attention: on, as whisper.cpp 1.8 defaults to, but stated here so that
#: a change of the bindings' default cannot change the runner. Off, base took 1.17x the time
#: and 88 MiB more peak memory for the same words (bench/models.py; docs/performance.md,
#: "Models and quantization").
FLASH_ATTENTION = True


@dataclass(frozen=True)
class Budget:
    """How long transcription may take: `floor` + `factor` x the seconds of audio whisper is
    given (silence the runner skips does not count). A runaway decode becomes a permanent,
    named failure long before the Job's deadline (TRANSCRIBE_BUDGET_FACTOR,
    TRANSCRIBE_BUDGET_FLOOR_SECONDS), instead of a timeout after hours."""

    factor: float = 1.0
    floor: float = 120.0

    def seconds(self, audio_seconds: float) -> float:
        return self.floor + self.factor * audio_seconds

    def exceeded(self, allowed: float, audio_seconds: float) -> PermanentError:
        return PermanentError(
            f"transcription exceeded its budget of {allowed:.0f} s for {audio_seconds:.0f} s "
            f"of audio (TRANSCRIBE_BUDGET_FACTOR={self.factor:g}, "
            f"TRANSCRIBE_BUDGET_FLOOR_SECONDS={self.floor:g}): whisper could not decode this "
            "audio in time (music, noise or chanting it keeps re-decoding, or a starved CPU)"
        )


class BudgetClock:
    """The abort callback's budget half: true once `allowed` seconds have passed since it
    was made; `tripped` records that it said so (whisper stopped early)."""

    def __init__(self, allowed: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = None if allowed is None else clock() + allowed
        self.tripped = False

    def __call__(self) -> bool:
        if self._deadline is not None and self._clock() > self._deadline:
            self.tripped = True
        return self.tripped


class Transcriber(Protocol):
    def transcribe(
        self,
        pcm: Path,
        language: str,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
        prompt: str = "",
    ) -> list[Segment]: ...


def check_language(language: str) -> str:
    """`auto` or a language whisper.cpp knows; anything else is a permanent, named error."""
    if language == "auto":
        return language
    import _pywhispercpp as pw

    if not language.isascii() or not language.isalpha() or pw.whisper_lang_id(language) < 0:
        raise PermanentError(
            f"language {language!r} is not one whisper knows (use e.g. zh, en, auto)"
        )
    return language


def window_levels(audio: Any) -> Any:
    """RMS level in dBFS of each 100 ms window of float samples in [-1, 1]."""
    import numpy as np

    count = -(-audio.size // _WINDOW)
    padded = np.zeros(count * _WINDOW, dtype=np.float32)
    padded[: audio.size] = audio
    power = np.mean(np.square(padded.reshape(count, _WINDOW), dtype=np.float64), axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(power)


def drop_silent(segments: list[Segment], levels: Any, threshold: float) -> list[Segment]:
    """Drop segments laid over audio that is silent from start to end (see SILENCE_DBFS);
    a segment that touches any audible window is kept, since whisper's times are loose."""
    kept = []
    for seg in segments:
        first = max(0, seg.start_ms // 100)
        last = max(first + 1, -(-seg.end_ms // 100))
        window = levels[first:last]
        if window.size == 0 or float(window.max()) >= threshold:
            kept.append(seg)
    return kept


class WhisperCpp:
    """One loaded model; `transcribe` may be called many times (the benchmark does)."""

    def __init__(
        self,
        model_path: Path,
        threads: int,
        beam_size: int = 0,
        window_seconds: int = 600,
        decoding: Decoding = BOUNDED,
        budget: Budget | None = None,
        flash_attn: bool = FLASH_ATTENTION,
    ) -> None:
        """`beam_size` 0 or 1 decodes greedily (whisper.cpp's default); 2 or more uses beam
        search with that many beams (WHISPER_BEAM_SIZE; bench/tuning.py weighs the cost).
        `window_seconds` is the longest stretch of audio given to whisper at once
        (WHISPER_WINDOW_SECONDS; jobrunner/windows.py). `decoding` bounds the work of a hard
        window, `budget` (None: unbounded) the time of the whole transcription. `flash_attn`
        is set explicitly (FLASH_ATTENTION), not left to the bindings' default."""
        if not model_path.is_file():
            raise PermanentError(f"whisper model {model_path} does not exist (WHISPER_MODEL)")
        from pywhispercpp.model import Model

        _big_blocks_back_to_the_system()
        # Before the model: with the image's dynamic backends nothing runs until one is loaded.
        self.backends = load_backends()
        self._threads = threads
        self.cuts = Cuts.for_seconds(window_seconds)
        self.beam_size = beam_size if beam_size > 1 else 0
        self.decoding = decoding
        self.budget = budget
        strategy: dict[str, Any] = (
            {"params_sampling_strategy": 1,
             "beam_search": {"beam_size": self.beam_size, "patience": -1.0}}
            if self.beam_size
            else {"params_sampling_strategy": 0}
        )  # fmt: skip
        try:
            self._model: Any = Model(
                str(model_path),
                redirect_whispercpp_logs_to=None,
                n_threads=threads,
                print_progress=False,
                print_realtime=False,
                print_timestamps=False,
                context_params={"flash_attn": flash_attn},
                **strategy,
            )
        except RunnerError:  # e.g. SIGTERM while loading: not the model's fault
            raise
        except Exception as exc:  # the bindings raise bare exceptions
            raise PermanentError(f"whisper model {model_path} could not be loaded: {exc}") from None
        if getattr(self._model, "_ctx", None) is None:
            raise PermanentError(f"whisper model {model_path} could not be loaded (WHISPER_MODEL)")

    def transcribe(
        self,
        pcm: Path,
        language: str,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
        prompt: str = "",
    ) -> list[Segment]:
        """Transcribe a 16 kHz mono s16le file window by window (jobrunner/windows.py), so
        memory does not grow with the talk's length. Each window is decoded with the end of
        the previous window's tokens as its context, exactly as whisper.cpp carries them
        between its own 30 s frames (the first window starts with none, so nothing leaks
        from an earlier talk).

        `prompt` (jobrunner/script.py: the job's or the language's initial prompt) is given
        to the first window only: it starts that window's context, and the later windows
        inherit it through the carried tokens. Given again, whisper.cpp would prepend it to
        the carried context of every window (its `initial_prompt` is added to, not
        replacing, the context of a previous call)."""
        levels = pcm_levels(pcm)
        if levels.size == 0:
            return []
        windows = plan_windows(levels.tolist(), SILENCE_DBFS, self.cuts)
        if not windows:
            log.info(
                "audio is silent throughout; not transcribed",
                extra={"action": "audio_silent", "dbfs": SILENCE_DBFS},
            )
            on_progress(1.0)
            return []
        total_ms = levels.size * FRAME_MS
        speech_s = sum(w.end - w.start for w in windows) * FRAME_MS / 1000
        allowed = self.budget.seconds(speech_s) if self.budget else None
        self._log_decoding(language, prompt, len(windows), speech_s, allowed)
        over_budget = BudgetClock(allowed)

        def abort() -> bool:
            return should_abort() or over_budget()

        buffers = WindowBuffers(max(w.end_sample - w.start_sample for w in windows))
        segments: list[Segment] = []
        for number, window in enumerate(windows):
            if abort():
                break
            audio = buffers.read(pcm, window.start_sample, window.end_sample)
            found = self._transcribe_window(
                audio, window, language, number, total_ms, on_progress, abort,
                prompt="" if number else prompt,
            )  # fmt: skip
            segments += to_talk_time(found, window)
        del buffers
        if over_budget.tripped and not should_abort() and self.budget and allowed is not None:
            log.warning(
                "transcription over its budget",
                extra={"action": "transcription_over_budget", "budget_seconds": round(allowed),
                       "speech_seconds": round(speech_s, 1), "segments": len(segments)},
            )  # fmt: skip
            raise self.budget.exceeded(allowed, speech_s)
        kept = drop_silent(segments, levels, SILENCE_DBFS)
        if len(kept) < len(segments):
            log.info(
                "dropped segments over silence",
                extra={"action": "silent_segments_dropped", "dropped": len(segments) - len(kept)},
            )
        return kept

    def _log_decoding(
        self, language: str, prompt: str, windows: int, speech_s: float, allowed: float | None
    ) -> None:
        params = self._model._params
        log.info(
            "whisper decoding",
            extra={
                "action": "whisper_decoding",
                "threads": params.n_threads,
                "strategy": str(params.strategy).rsplit(".", 1)[-1],
                "beam_size": params.beam_search["beam_size"] if self.beam_size else 0,
                "windows": windows,
                "window_seconds": self.cuts.max_frames * FRAME_MS // 1000,
                "language": language,
                "prompt_chars": len(prompt),
                "speech_seconds": round(speech_s, 1),
                "budget_seconds": None if allowed is None else round(allowed, 1),
                "temperature_inc": self.decoding.temperature_inc,
                "best_of": self.decoding.best_of,
                "flash_attn": bool(self._model._context_params.flash_attn),
                "audio_ctx": self.decoding.audio_ctx,
                "cpu_backend": self.backends.cpu,
                "blas": self.backends.blas,
            },
        )

    def _transcribe_window(
        self,
        audio: Any,
        window: Window,
        language: str,
        number: int,
        total_ms: int,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
        prompt: str = "",
    ) -> list[Segment]:
        """One whisper.cpp run over one window's samples (`audio`, float32), the `number`th
        of the talk. With `auto`, the segments carry the language whisper detected for the
        window (from its first 30 s), which decides whether they are converted as Chinese.

        Every window after the first keeps the decoder's past tokens from the previous
        run (whisper.cpp holds them on its state; `no_context` clears them). They include
        the timestamp tokens, which keep whisper cutting lines as it does inside one run:
        measured on a looped speech sample with 30 s windows, a text-only prompt
        (`initial_prompt`) gave 25-second lines, the carried tokens the same lines as one
        whole-file run. `prompt` is whisper's `initial_prompt`: text it continues (script,
        punctuation, names)."""
        import _pywhispercpp as pw

        def on_segment(segment: Any) -> None:
            done_ms = window.start_ms + segment.t1 * _TICK_MS
            on_progress(min(1.0, done_ms / total_ms))

        try:
            # Parameters set here stay set on the model: pass every one, every time.
            self._model.transcribe(
                audio,
                new_segment_callback=on_segment,
                abort_callback=should_abort,
                language=language,
                n_threads=self._threads,
                no_context=number == 0,
                initial_prompt=prompt,
                **self.decoding.params(),
            )
        except RunnerError:
            raise
        except Exception as exc:
            raise ToolError(f"whisper failed: {exc}") from None
        ctx = self._model._ctx  # the bindings keep segments on the context; read raw bytes
        count = pw.whisper_full_n_segments(ctx)
        raw = (
            (
                pw.whisper_full_get_segment_t0(ctx, i) * _TICK_MS,
                pw.whisper_full_get_segment_t1(ctx, i) * _TICK_MS,
                pw.whisper_full_get_segment_text(ctx, i),
            )
            for i in range(count)
        )
        detected = None
        if language == "auto":
            detected = pw.whisper_lang_str(pw.whisper_full_lang_id(ctx))
            log.info(
                "window language detected",
                extra={"action": "window_language_detected", "window": number,
                       "start_ms": window.start_ms, "language": detected},
            )  # fmt: skip
        return decode_segments(raw, detected)


class WindowBuffers:
    """The samples of one window, in two arrays allocated once per talk for its longest
    window and reused by every window (int16 as read, float32 for whisper).

    Why: allocating them afresh for each window let the runner's peak creep up with the
    number of windows (bench/longtalk.py measured +13% from a 15-minute talk to an hour);
    with the same two blocks for the whole talk, the talk's length changes nothing."""

    def __init__(self, samples: int) -> None:
        import numpy as np

        self._raw = np.empty(samples, dtype="<i2")
        self._audio = np.empty(samples, dtype=np.float32)

    def read(self, pcm: Path, start: int, end: int) -> Any:
        """Samples [start, end) of a s16le file as float32 in [-1, 1]: a view into the
        buffer, valid until the next `read`."""
        import numpy as np

        count = end - start
        if count > self._raw.size:
            raise ValueError(f"a window of {count} samples does not fit {self._raw.size}")
        with pcm.open("rb") as source:
            source.seek(2 * start)
            into: Any = self._raw[:count]  # numpy arrays are writable buffers
            got = (source.readinto(memoryview(into).cast("B")) or 0) // 2
        audio = self._audio[:got]
        audio[...] = self._raw[:got]
        audio *= np.float32(1 / 32768)  # a power of two: exact
        return audio


def _big_blocks_back_to_the_system() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so every large block (whisper.cpp's mel
    spectrogram of a window, numpy's temporaries) is its own mapping and goes back to the
    system when freed. By default the threshold slides up to the size of a freed block, after
    which blocks that size come from the heap and can stay there, fragmented, one window
    after another. Process-wide and harmless to repeat; skipped where there is no glibc."""
    import ctypes

    m_mmap_threshold = -3  # <malloc.h>
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        log.debug(
            "mallopt is not available; the default allocator settings stay",
            extra={"action": "mallopt_unavailable"},
        )


def read_samples(pcm: Path, start: int, end: int) -> Any:
    """Samples [start, end) of a s16le file as float32 in [-1, 1]; only those are read."""
    import numpy as np

    raw = np.fromfile(pcm, dtype="<i2", count=max(0, end - start), offset=2 * start)
    audio = raw.astype(np.float32)
    audio /= 32768.0
    return audio


def pcm_levels(pcm: Path, block_frames: int = 600) -> Any:
    """The dBFS level of every 100 ms frame of a s16le file, read a block at a time (one
    minute by default), so a three-hour talk costs a 1 MB array of levels, not its audio."""
    import numpy as np

    samples = pcm.stat().st_size // 2
    block = block_frames * FRAME_SAMPLES
    parts = [
        window_levels(read_samples(pcm, first, min(samples, first + block)))
        for first in range(0, samples, block)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)
