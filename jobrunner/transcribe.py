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

from jobrunner.errors import PermanentError, ToolError
from jobrunner.subtitles import Segment, decode_segments

log = logging.getLogger(__name__)

#: whisper.cpp timestamps are in centiseconds.
_TICK_MS = 10


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


class WhisperCpp:
    """One loaded model; `transcribe` may be called many times (the benchmark does)."""

    def __init__(self, model_path: Path, threads: int) -> None:
        if not model_path.is_file():
            raise PermanentError(f"whisper model {model_path} does not exist (WHISPER_MODEL)")
        from pywhispercpp.model import Model

        self._threads = threads
        try:
            self._model: Any = Model(
                str(model_path),
                redirect_whispercpp_logs_to=None,
                n_threads=threads,
                print_progress=False,
                print_realtime=False,
                print_timestamps=False,
            )
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
        total_ms = audio.size * 1000 / 16000

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
        return decode_segments(raw)
