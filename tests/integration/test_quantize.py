"""Quantized models made by devtools/quantize.py load in the runner's whisper.cpp and
transcribe real speech; the runner states whisper.cpp's flash attention itself.

The quantize tool is built once from the installed bindings' own source (4-6 minutes on
2 busy cores, then cached under ~/.cache/dharma-stream/quantize/); with it cached, this file
takes a few seconds. The test skips only if the tool cannot be built, and says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.accuracy import JFK_TEXT, score, to_pcm
from devtools.media import JFK, TINY_EN, WEIGHTLESS_MODEL
from devtools.quantize import QuantizeError, build_tool, quantize, sha256
from jobrunner.transcribe import FLASH_ATTENTION, WhisperCpp

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tool() -> Path:
    try:
        return build_tool()
    except QuantizeError as exc:
        pytest.skip(f"whisper.cpp's quantize tool could not be built: {exc}")


@pytest.mark.skipif(not TINY_EN.is_file(), reason=f"{TINY_EN} is not present")
def test_quantized_tiny_model_transcribes_jfk(tool: Path, tmp_path: Path) -> None:
    made = quantize(tool, TINY_EN, "q5_1", tmp_path)
    assert made.name == "ggml-tiny.en-q5_1.bin"
    assert made.stat().st_size < TINY_EN.stat().st_size / 2
    again = quantize(tool, TINY_EN, "q5_1", tmp_path / "again")
    assert sha256(again) == sha256(made)  # deterministic: a deployment can pin the checksum

    pcm = tmp_path / "jfk.pcm"
    to_pcm(JFK, pcm)
    whisper = WhisperCpp(made, 2, window_seconds=300)
    text = " ".join(s.text for s in whisper.transcribe(pcm, "en", lambda _f: None, lambda: False))
    assert score(JFK_TEXT, text, "en").edits == 0, text


def test_runner_sets_flash_attention_explicitly() -> None:
    assert WhisperCpp(WEIGHTLESS_MODEL, 1)._model._context_params.flash_attn is FLASH_ATTENTION
    off = WhisperCpp(WEIGHTLESS_MODEL, 1, flash_attn=False)
    assert off._model._context_params.flash_attn is False
