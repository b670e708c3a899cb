"""The runner's model choice and checksum (jobrunner/models.py, issue 12 item 3): a name is
only a key of the catalog, the file is the catalog's below WHISPER_MODELS_DIR, and a file
that is missing or not the catalog's is a permanent error naming both checksums."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from dharma_common.settings import ConfigError, load_settings
from jobrunner.errors import PermanentError
from jobrunner.models import BLOCK_BYTES, ModelFile, chosen_model, file_sha256, verify_model
from jobrunner.settings import RunnerSettings

CONTENT = b"ggml" + bytes(range(256)) * (BLOCK_BYTES // 256 * 2 + 3)  # > two blocks
SHA = hashlib.sha256(CONTENT).hexdigest()


def settings(tmp_path: Path, **overrides: Any) -> RunnerSettings:
    catalog = {
        "tiny.en": {"file": "ggml-tiny.en.bin", "sha256": SHA, "memory": "512Mi"},
        "small": {"file": "volume/ggml-small.bin", "sha256": "b" * 64},
    }
    values: dict[str, Any] = {
        "DB_HOST": "db", "DB_USER": "u", "WEBDAV_BASE_URL": "http://dav.example.org",
        "WHISPER_MODELS": json.dumps(catalog), "WHISPER_MODELS_DIR": str(tmp_path),
        "WHISPER_MODEL": "tiny.en",
    }  # fmt: skip
    values.update(overrides)
    return load_settings(RunnerSettings, **values)


def test_a_name_is_the_catalog_entrys_file_below_the_models_directory(tmp_path: Path) -> None:
    assert chosen_model(settings(tmp_path)) == ModelFile(
        "tiny.en", tmp_path / "ggml-tiny.en.bin", SHA
    )
    assert chosen_model(settings(tmp_path, WHISPER_MODEL="small")).path == (
        tmp_path / "volume" / "ggml-small.bin"
    )


def test_a_path_that_is_a_catalog_file_is_that_model_and_checked(tmp_path: Path) -> None:
    """The image's WHISPER_MODEL=/models/ggml-base.bin (from before the catalog) is `base`."""
    chosen = chosen_model(settings(tmp_path, WHISPER_MODEL=str(tmp_path / "ggml-tiny.en.bin")))
    assert (chosen.name, chosen.sha256) == ("tiny.en", SHA)


def test_the_images_own_checksum_wins_for_the_file_it_baked(tmp_path: Path) -> None:
    """An image built with another model file under the same name (the test images bake the
    test copy of ggml-base.bin) says its checksum in WHISPER_MODEL_SHA256 (Dockerfile.worker):
    that file is checked against it, not against the catalog's entry for the official file,
    which would fail every job of such an image (seen on the real node)."""
    path = tmp_path / "ggml-tiny.en.bin"
    own = "c" * 64
    chosen = chosen_model(settings(tmp_path, WHISPER_MODEL=str(path), WHISPER_MODEL_SHA256=own))
    assert chosen == ModelFile("tiny.en", path, own, "WHISPER_MODEL_SHA256")
    elsewhere = tmp_path / "elsewhere.bin"
    chosen = chosen_model(
        settings(tmp_path, WHISPER_MODEL=str(elsewhere), WHISPER_MODEL_SHA256=own)
    )
    assert (chosen.name, chosen.sha256) == (None, own)
    # A job naming its model gets the catalog's file and checksum, whatever the image says.
    assert chosen_model(settings(tmp_path, WHISPER_MODEL_SHA256=own)).sha256 == SHA


def test_any_other_path_is_used_as_is_unverified(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "for-tests-ggml-tiny.bin"
    assert chosen_model(settings(tmp_path, WHISPER_MODEL=str(path))) == ModelFile(None, path, None)


def test_a_name_the_catalog_lacks_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"WHISPER_MODEL='large' is invalid: .*known models: "
                       r"small, tiny.en, or the path of a ggml file"):  # fmt: skip
        settings(tmp_path, WHISPER_MODEL="large")


def test_default_is_the_images_base_model() -> None:
    runner = load_settings(
        RunnerSettings, DB_HOST="db", DB_USER="u", WEBDAV_BASE_URL="http://dav.example.org"
    )
    chosen = chosen_model(runner)
    assert chosen.name == "base"
    assert chosen.path == Path("/models/ggml-base.bin")


def test_file_sha256_streams_in_blocks(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(CONTENT)
    assert file_sha256(path) == SHA
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_the_right_file_passes(tmp_path: Path) -> None:
    (tmp_path / "ggml-tiny.en.bin").write_bytes(CONTENT)
    verify_model(chosen_model(settings(tmp_path)))


def test_a_changed_file_is_permanent_with_both_checksums(tmp_path: Path) -> None:
    (tmp_path / "ggml-tiny.en.bin").write_bytes(CONTENT[:-1])
    actual = hashlib.sha256(CONTENT[:-1]).hexdigest()
    with pytest.raises(PermanentError) as caught:
        verify_model(chosen_model(settings(tmp_path)))
    assert str(caught.value) == (
        f"model tiny.en: {tmp_path}/ggml-tiny.en.bin has sha256 {actual}, the catalog says "
        f"{SHA} (WHISPER_MODELS)"
    )


def test_a_missing_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"model small: .*/volume/ggml-small.bin does not "
                       r"exist"):  # fmt: skip
        verify_model(chosen_model(settings(tmp_path, WHISPER_MODEL="small")))


def test_an_unverified_path_must_still_exist(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"model file: .* does not exist"):
        verify_model(ModelFile(None, tmp_path / "nope.bin", None))
    (tmp_path / "there.bin").write_bytes(b"x")
    verify_model(ModelFile(None, tmp_path / "there.bin", None))
