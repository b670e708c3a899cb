"""Quantized whisper models made with whisper.cpp's own `quantize` tool (issue 12, item 3).

Why from the bindings' own source distribution: a quantized file must load in the whisper.cpp
that the runner actually runs, and the ggml quantization formats have changed between
whisper.cpp releases. The pywhispercpp sdist of the version installed here (the one pinned in
requirements/constraints.txt, which Dockerfile.worker also builds from source) bundles its
whisper.cpp and ggml, so building `examples/quantize` from it gives the tool of exactly that
version. It is fetched with pip (the only route to it here: PyPI), built once with CMake into
`~/.cache/dharma-stream/quantize/` (outside the repository) and reused; nothing in the image
or the runner depends on it.

Quantization is deterministic (ggml's reference quantizers), so the same fp16 model always
gives the same file: the printed SHA-256 is what a deployment pins.

Usage:
  python -m devtools.quantize MODEL.bin [MODEL.bin ...] [--types q8_0,q5_1,q5_0] [--out DIR]
  python -m devtools.quantize --build-only
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from devtools.cache import CACHE

TOOL_CACHE = CACHE / "quantize"
MODELS_OUT = CACHE / "models"
#: The types worth measuring on CPU (docs/performance.md, "Models and quantization"): q8_0 is
#: nearly lossless, q5_1/q5_0 are whisper.cpp's usual recommendation for size and speed.
DEFAULT_TYPES = ("q8_0", "q5_1", "q5_0")
#: What ggml_parse_ftype (examples/common-ggml.cpp) accepts.
KNOWN_TYPES = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k",
                         "q5_k", "q6_k"})  # fmt: skip
#: Only what `whisper-quantize` needs: a static, portable (GGML_NATIVE=OFF) build without
#: tests, server, SDL or curl. Kept in the stamp, so a change here rebuilds.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DWHISPER_BUILD_EXAMPLES=ON",
    "-DWHISPER_BUILD_TESTS=OFF",
    "-DWHISPER_BUILD_SERVER=OFF",
    "-DWHISPER_SDL2=OFF",
    "-DWHISPER_CURL=OFF",
)
TARGET = "whisper-quantize"


class QuantizeError(RuntimeError):
    """The tool could not be fetched, built or run; the message says which step and why."""


def bindings_version() -> str:
    """The pywhispercpp version installed here: the source the tool must come from."""
    return importlib.metadata.version("pywhispercpp")


def quantized_name(model: Path, qtype: str) -> str:
    """`ggml-base.bin` + q5_1 -> `ggml-base-q5_1.bin` (whisper.cpp's own naming)."""
    if qtype not in KNOWN_TYPES:
        raise ValueError(f"unknown quantization type {qtype!r} (one of {sorted(KNOWN_TYPES)})")
    stem = model.name.removesuffix(".bin")
    if not stem.startswith("ggml-"):
        raise ValueError(f"{model.name} is not a ggml model file name (ggml-<model>.bin)")
    return f"{stem}-{qtype}.bin"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_version(whisper_dir: Path) -> str:
    """whisper.cpp's version as its CMakeLists.txt declares it (`project(... VERSION x)`)."""
    text = (whisper_dir / "CMakeLists.txt").read_text()
    found = re.search(r'project\("whisper\.cpp" VERSION ([0-9.]+)\)', text)
    if not found:
        raise QuantizeError(f"no whisper.cpp version in {whisper_dir / 'CMakeLists.txt'}")
    return found[1]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One build at a time (a test and a command line may both want the tool)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], step: str, log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise QuantizeError(f"{step} failed (exit {done.returncode}; {log}):\n" + "\n".join(tail))


def _sdist(version: str, into: Path, log: Path) -> Path:
    """pywhispercpp's source distribution of `version`, downloaded once with pip."""
    found = sorted(into.glob(f"pywhispercpp-{version}.tar.gz"))
    if found:
        return found[0]
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
          "pywhispercpp", "-d", str(into), f"pywhispercpp=={version}"],
         f"downloading pywhispercpp {version}'s source", log)  # fmt: skip
    found = sorted(into.glob(f"pywhispercpp-{version}.tar.gz"))
    if not found:
        raise QuantizeError(f"pip gave no pywhispercpp-{version}.tar.gz in {into}")
    return found[0]


def _extract_whisper_cpp(sdist: Path, into: Path) -> Path:
    """The sdist's bundled whisper.cpp directory, extracted once (members checked: no path
    leaves `into`)."""
    top = sdist.name.removesuffix(".tar.gz")
    whisper_dir = into / top / "whisper.cpp"
    if (whisper_dir / "CMakeLists.txt").is_file():
        return whisper_dir
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/whisper.cpp/")]
        tar.extractall(into, members=members, filter="data")
    return whisper_dir


def build_tool(cache: Path = TOOL_CACHE, jobs: int = 2) -> Path:
    """`whisper-quantize` built from the installed bindings' own source; built once, then
    taken from `cache` as long as the version and CMake options are the same."""
    version = bindings_version()
    build = cache / f"build-{version}"
    tool = build / "bin" / TARGET
    stamp = build / "dharma-stamp"
    wanted = "\n".join((version, *CMAKE_OPTIONS))
    with _locked(cache):
        if tool.is_file() and stamp.is_file() and stamp.read_text() == wanted:
            return tool
        for program in ("cmake", "c++"):
            if shutil.which(program) is None:
                raise QuantizeError(f"{program} is not installed (apt-get install cmake g++)")
        log = cache / f"build-{version}.log"
        log.write_text("")
        whisper_dir = _extract_whisper_cpp(_sdist(version, cache / "src", log), cache / "src")
        shutil.rmtree(build, ignore_errors=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(whisper_dir), "-B", str(build), *generator, *CMAKE_OPTIONS],
             "configuring whisper.cpp", log)  # fmt: skip
        _run(["cmake", "--build", str(build), "--target", TARGET, "-j", str(jobs)],
             f"building {TARGET}", log)  # fmt: skip
        if not tool.is_file():
            raise QuantizeError(f"the build did not produce {tool} (see {log})")
        stamp.write_text(wanted)
        (build / "whisper-cpp-version").write_text(bundled_version(whisper_dir) + "\n")
        return tool


def quantize(tool: Path, model: Path, qtype: str, out_dir: Path, force: bool = False) -> Path:
    """`out_dir/ggml-<model>-<qtype>.bin` from the fp16 `model`. An existing file is kept
    (the tool is deterministic) unless `force`; a new one appears only when complete."""
    out = out_dir / quantized_name(model, qtype)
    if out.is_file() and not force:
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out_dir, prefix=f".{out.name}.", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        done = subprocess.run([str(tool), str(model), str(partial), qtype],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
            raise QuantizeError(f"{TARGET} {model.name} {qtype} failed: {tail}")
        partial.chmod(0o444)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("models", nargs="*", type=Path, help="fp16 ggml models (ggml-*.bin)")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated")
    parser.add_argument("--out", type=Path, default=MODELS_OUT, help="where the files go")
    parser.add_argument("--force", action="store_true", help="quantize again even if present")
    parser.add_argument("--build-only", action="store_true", help="build the tool and stop")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if not args.models and not args.build_only:
        parser.error("name at least one model (or --build-only)")
    try:
        for model in args.models:
            for qtype in types:
                quantized_name(model, qtype)  # refuse bad names before a 4-minute build
            if not model.is_file():
                parser.error(f"{model} does not exist")
        tool = build_tool()
    except (ValueError, QuantizeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tool: {tool} (pywhispercpp {bindings_version()}, whisper.cpp "
          f"{(tool.parents[1] / 'whisper-cpp-version').read_text().strip()})")  # fmt: skip
    for model in args.models:
        for qtype in types:
            try:
                out = quantize(tool, model, qtype, args.out, args.force)
            except QuantizeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{sha256(out)}  {out.stat().st_size:>11,} B  {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
