"""Which ggml CPU code whisper.cpp runs: the image ships one library per instruction-set level
and the best one the node's CPU supports is loaded before the model.

Why: a portable image cannot be compiled for the node it will run on, yet the same whisper
work took 0.71x the time with AVX-512 and 0.56x with AMX on q8_0 models than the portable
AVX2 build (docs/performance.md, "Runtime-selected CPU variants"). ggml's answer is
`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS` (Dockerfile.worker): `libggml-cpu-<level>.so`
for x64, haswell, skylakex, ..., sapphirerapids, each scoring itself against the CPU, and
`libggml-blas.so` for OpenBLAS. Neither libwhisper 1.8.5 nor pywhispercpp 1.5.1 loads them
(with none loaded whisper finds no device and aborts the process), so the runner calls
`ggml_backend_load_all_from_path` itself, once per process, before the model loads.

A build without dynamic backends (PyPI's wheel, the test virtualenv) has the CPU code built
in: there is nothing to load, and `load_backends` says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from jobrunner.errors import PermanentError

#: What the variants' file names look like: libggml-cpu-haswell.so, libggml-cpu-x64.so, ...
_VARIANT = re.compile(r"libggml-cpu-([A-Za-z0-9_]+)\.so$")
_BUILT_IN = "built-in"


@dataclasses.dataclass(frozen=True)
class Backends:
    """What ggml runs on in this process: the CPU variant's level ("sapphirerapids",
    "haswell", ...; "built-in" for a build without dynamic backends) and whether OpenBLAS's
    backend is loaded (with built-in CPU code: whether the build has it linked in)."""

    cpu: str
    blas: bool


def bindings_dir() -> Path:
    """The directory of the `_pywhispercpp` extension, where the image puts ggml's libraries
    (they find each other there through RUNPATH=$ORIGIN)."""
    spec = importlib.util.find_spec("_pywhispercpp")
    if spec is None or spec.origin is None:
        raise PermanentError("the whisper.cpp bindings (_pywhispercpp) are not installed")
    return Path(spec.origin).parent


@functools.cache
def load_backends() -> Backends:
    """Load the best CPU variant (and OpenBLAS) from the bindings' directory, once per
    process; later calls return the first answer (loading twice would register twice)."""
    return load_from(bindings_dir())


def load_from(directory: Path, maps: Path = Path("/proc/self/maps")) -> Backends:
    """Load ggml's dynamic backends from `directory` (see `load_backends`). `maps` tells
    which variant the loader kept: ggml opens every candidate to score it and keeps only the
    best mapped, and it has no call that names the one it chose."""
    variants = sorted(p.name for p in directory.glob("libggml-cpu-*.so") if _VARIANT.search(p.name))
    if not variants:
        return Backends(_BUILT_IN, (directory / "libggml-blas.so").is_file())
    import _pywhispercpp  # noqa: F401  (maps libggml the way the bindings link it)

    libggml = _libggml(directory, _loaded_libraries(maps, directory))
    try:
        ggml = ctypes.CDLL(str(libggml))
        load_all = ggml.ggml_backend_load_all_from_path
    except (OSError, AttributeError) as exc:
        raise PermanentError(f"ggml's backend loader is not usable in {libggml}: {exc}") from None
    load_all.argtypes = [ctypes.c_char_p]
    load_all.restype = None
    # ggml reports each library it loads on stderr, outside our structured log: silenced, as
    # the runner silences whisper.cpp's own log (the outcome is logged by the caller).
    with _stderr_to_devnull():
        load_all(str(directory).encode())
    loaded = _loaded_libraries(maps, directory)
    cpu = sorted(m.group(1) for name in loaded if (m := _VARIANT.search(name)))
    if not cpu:
        raise PermanentError(
            f"no ggml CPU library in {directory} runs on this CPU (found: {', '.join(variants)})"
        )
    return Backends(cpu[0], "libggml-blas.so" in loaded)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 points to /dev/null meanwhile (C code writes there, not to
    sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _libggml(directory: Path, loaded: set[str]) -> Path:
    """The copy of libggml the bindings already mapped (libwhisper needs `libggml.so.0`).
    A wheel installs libggml.so, .so.0 and .so.0.13.1 as three files, not links: loading
    another of them would map a second ggml with a backend registry of its own, the variants
    would register there, and whisper would still find no device."""
    mapped = sorted(n for n in loaded if re.fullmatch(r"libggml\.so(\.[0-9]+)*", n))
    return directory / (mapped[0] if mapped else "libggml.so")


def _loaded_libraries(maps: Path, directory: Path) -> set[str]:
    """File names of the libraries from `directory` mapped into this process."""
    prefix = str(directory.resolve()) + "/"
    names: set[str] = set()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset device inode [path]
        if len(fields) == 6 and fields[5].startswith(prefix):
            names.add(fields[5][len(prefix) :])
    return names


def main() -> int:
    """`python -m jobrunner.backends`: load, print what was loaded as JSON, and fail unless it
    is a CPU variant with OpenBLAS — what Dockerfile.worker builds. The image's build runs it
    (as root and as the runner's user), so a build that lost its variants or OpenBLAS fails
    there, not at the first job."""
    try:
        backends = load_backends()
    except PermanentError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(backends)))
    if backends.cpu == _BUILT_IN or not backends.blas:
        print("expected a ggml CPU variant and OpenBLAS's backend", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
