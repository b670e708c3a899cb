"""Speech to text with whisper.cpp through the `pywhispercpp` bindings.

Why the bindings and not the CLI: the model loads once per process, PCM goes in as an array
(whisper.cpp cannot read AAC — DESIGN.md defect 2), segments arrive through a callback (our
progress), and an abort callback lets a cancelled or fenced-out attempt stop in seconds. The
production image builds the same bindings from source with OpenBLAS (Dockerfile.worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from jobrunner.errors import PermanentError, RunnerError, ToolError
from jobrunner.subtitles import Segment, decode_segments

log = logging.getLogger(__name__)

#: whisper.cpp timestamps are in centiseconds.
_TICK_MS = 10
_RATE = 16000
#: Loudness is measured over 100 ms windows.
_WINDOW = _RATE // 10
#: A window quieter than this is silence. Digital silence is -inf; the room tone of a quiet
#: hall is around -60 dBFS and speech -35 to -10 dBFS, so nothing a person can hear as speech
#: is below it. Whisper invents text on silence (with `zh` on 20 s of digital silence, the
#: base model wrote one line and then another nine times), so a segment whose every window
#: is silent is dropped, and audio that is silent throughout is not transcribed at all.
SILENCE_DBFS = -60.0


class Transcriber(Protocol):
    def transcribe(
        self,
        pcm: Path,
        language: str,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
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

    def __init__(self, model_path: Path, threads: int, beam_size: int = 0) -> None:
        """`beam_size` 0 or 1 decodes greedily (whisper.cpp's default); 2 or more uses beam
        search with that many beams (WHISPER_BEAM_SIZE; bench/tuning.py weighs the cost)."""
        if not model_path.is_file():
            raise PermanentError(f"whisper model {model_path} does not exist (WHISPER_MODEL)")
        from pywhispercpp.model import Model

        self._threads = threads
        self.beam_size = beam_size if beam_size > 1 else 0
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
    ) -> list[Segment]:
        import _pywhispercpp as pw
        import numpy as np

        samples = np.fromfile(pcm, dtype="<i2")
        if samples.size == 0:
            return []
        audio = samples.astype(np.float32) / 32768.0
        del samples
        levels = window_levels(audio)
        if float(levels.max()) < SILENCE_DBFS:
            log.info("audio is silent throughout; not transcribed", extra={"dbfs": SILENCE_DBFS})
            on_progress(1.0)
            return []
        total_ms = audio.size * 1000 / _RATE
        params = self._model._params
        log.info(
            "whisper decoding",
            extra={
                "threads": params.n_threads,
                "strategy": str(params.strategy).rsplit(".", 1)[-1],
                "beam_size": params.beam_search["beam_size"] if self.beam_size else 0,
            },
        )

        def on_segment(segment: Any) -> None:
            on_progress(min(1.0, segment.t1 * _TICK_MS / total_ms))

        try:
            self._model.transcribe(
                audio,
                new_segment_callback=on_segment,
                abort_callback=should_abort,
                language=language,
                n_threads=self._threads,
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
        segments = decode_segments(raw)
        kept = drop_silent(segments, levels, SILENCE_DBFS)
        if len(kept) < len(segments):
            log.info("dropped segments over silence", extra={"dropped": len(segments) - len(kept)})
        return kept
