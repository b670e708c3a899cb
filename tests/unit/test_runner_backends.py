"""Loading ggml's CPU variants before the model (jobrunner/backends.py).

Why these stand-ins: the image's real variant libraries are built only in Dockerfile.worker
(tests/deploy/test_images.py and the real-node suite load them there). Here a small C
library, compiled by the test with the system's C compiler, plays `libggml.so`: its
`ggml_backend_load_all_from_path` opens the files a real loader would keep, so the ctypes call,
the stderr silencing and the reading of /proc/self/maps run for real in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobrunner.backends import Backends, _libggml, _loaded_libraries, load_backends, load_from
from jobrunner.errors import PermanentError

LOADER = r"""
#include <dlfcn.h>
#include <stdio.h>
void ggml_backend_load_all_from_path(const char *dir) {
    const char *names[] = {"libggml-cpu-" LEVEL ".so", "libggml-blas.so"};
    char path[4096];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        dlopen(path, RTLD_NOW | RTLD_LOCAL);
    }
    fprintf(stderr, "load_backend: loaded CPU backend from %s\n", dir);
}
"""


def compile_library(path: Path, source: str, *defines: str) -> None:
    src = path.with_suffix(".c")
    src.write_text(source)
    cmd = ["cc", "-shared", "-fPIC", *defines, "-o", str(path), str(src), "-ldl"]
    subprocess.run(cmd, check=True, capture_output=True)


def ggml_dir(tmp_path: Path, keeps: str, variants: list[str], blas: bool) -> Path:
    """A bindings directory whose stand-in loader keeps the variant named `keeps`."""
    compile_library(tmp_path / "libggml.so", LOADER, f'-DLEVEL="{keeps}"')
    for level in variants:
        compile_library(tmp_path / f"libggml-cpu-{level}.so", "int ggml_stand_in;\n")
    if blas:
        compile_library(tmp_path / "libggml-blas.so", "int ggml_blas_stand_in;\n")
    return tmp_path


def test_the_variant_the_loader_keeps_is_reported_and_its_chatter_silenced(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    directory = ggml_dir(tmp_path, "haswell", ["x64", "haswell", "skylakex"], blas=True)
    assert load_from(directory) == Backends("haswell", True)
    assert "load_backend" not in capfd.readouterr().err


def test_without_openblas_the_variant_runs_alone(tmp_path: Path) -> None:
    directory = ggml_dir(tmp_path, "x64", ["x64", "haswell"], blas=False)
    assert load_from(directory) == Backends("x64", False)


def test_no_variant_for_this_cpu_is_a_permanent_error_naming_the_files(tmp_path: Path) -> None:
    directory = ggml_dir(tmp_path, "none", ["zen4", "sapphirerapids"], blas=False)
    with pytest.raises(PermanentError) as err:
        load_from(directory)
    assert "libggml-cpu-sapphirerapids.so, libggml-cpu-zen4.so" in str(err.value)


def test_a_loader_without_the_entry_point_is_a_permanent_error(tmp_path: Path) -> None:
    compile_library(tmp_path / "libggml.so", "int not_the_loader;\n")
    compile_library(tmp_path / "libggml-cpu-x64.so", "int ggml_stand_in;\n")
    with pytest.raises(PermanentError, match="backend loader is not usable"):
        load_from(tmp_path)


def test_built_in_cpu_code_needs_no_loading(tmp_path: Path) -> None:
    """PyPI's wheel and the image before variants: libggml-cpu.so (no level) or hashed names."""
    (tmp_path / "libggml-cpu.so").write_bytes(b"")
    assert load_from(tmp_path) == Backends("built-in", False)
    (tmp_path / "libggml-blas.so").write_bytes(b"")
    assert load_from(tmp_path) == Backends("built-in", True)


def test_the_test_virtualenv_runs_the_wheels_built_in_cpu_code() -> None:
    assert load_backends() == Backends("built-in", False)


def test_only_libraries_mapped_from_the_directory_count(tmp_path: Path) -> None:
    directory = tmp_path / "site"
    directory.mkdir()
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/libggml-cpu-x64.so\n"
        f"7f02-7f03 r-xp 00000000 08:01 43 {directory}/libggml-cpu-icelake.so\n"
        f"7f04-7f05 r--p 00001000 08:01 43 {directory}/libggml-cpu-icelake.so\n"
        "7f06-7f07 rw-p 00000000 00:00 0 \n"
        "7f08-7f09 rw-p 00000000 00:00 0 [heap]\n"
    )
    assert _loaded_libraries(maps, directory) == {"libggml-cpu-icelake.so"}


def test_the_module_fails_without_variants_as_the_images_build_needs() -> None:
    """`python -m jobrunner.backends` is the image build's check; in the test virtualenv
    (PyPI's wheel: built-in CPU code, no OpenBLAS) it must fail."""
    done = subprocess.run(
        [sys.executable, "-m", "jobrunner.backends"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done
    assert json.loads(done.stdout) == {"cpu": "built-in", "blas": False}


def test_the_loader_is_called_in_the_copy_of_libggml_the_bindings_mapped(tmp_path: Path) -> None:
    """A wheel's libggml.so, .so.0 and .so.0.13.1 are three files: the call must go to the one
    libwhisper mapped, or the variants register in a second ggml that whisper never asks (seen
    in the image: `GGML_ASSERT(device)` when pywhispercpp was imported first)."""
    assert _libggml(tmp_path, {"libggml.so.0", "libggml-base.so.0", "libwhisper.so.1"}) == (
        tmp_path / "libggml.so.0"
    )
    assert _libggml(tmp_path, {"libggml-base.so.0"}) == tmp_path / "libggml.so"
