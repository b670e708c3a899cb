"""devtools/quantize.py: output names and the version check, without building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.quantize import QuantizeError, bundled_version, quantized_name


@pytest.mark.parametrize(
    ("model", "qtype", "expected"),
    [
        ("ggml-base.bin", "q5_1", "ggml-base-q5_1.bin"),
        ("ggml-tiny.en.bin", "q8_0", "ggml-tiny.en-q8_0.bin"),
        ("/x/ggml-large-v3.bin", "q5_0", "ggml-large-v3-q5_0.bin"),
    ],
)
def test_quantized_name(model: str, qtype: str, expected: str) -> None:
    assert quantized_name(Path(model), qtype) == expected


def test_quantized_name_refuses_unknown_types_and_names() -> None:
    with pytest.raises(ValueError, match="unknown quantization type 'q7'"):
        quantized_name(Path("ggml-base.bin"), "q7")
    with pytest.raises(ValueError, match="not a ggml model file name"):
        quantized_name(Path("base.bin"), "q8_0")


def test_bundled_version(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text('project("whisper.cpp" VERSION 1.8.5)\n')
    assert bundled_version(tmp_path) == "1.8.5"
    (tmp_path / "CMakeLists.txt").write_text("project(other)\n")
    with pytest.raises(QuantizeError, match=r"no whisper\.cpp version"):
        bundled_version(tmp_path)
