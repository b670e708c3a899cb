"""devtools.cache: the Python side reads DHARMA_CACHE as the scripts do."""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.cache import cache_dir


def test_an_empty_setting_means_the_default_as_in_the_scripts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """bash's `${DHARMA_CACHE:-$HOME/.cache/dharma-stream}` takes an empty value for unset;
    the Python copies this replaced took it for the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DHARMA_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "dharma-stream"
    monkeypatch.delenv("DHARMA_CACHE")
    assert cache_dir() == tmp_path / ".cache" / "dharma-stream"


def test_a_setting_names_the_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DHARMA_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
