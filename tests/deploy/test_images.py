"""The container images, built and run for real (`scripts/images`: a dockerd of its own).

Why: test_dockerfiles.py reads the Dockerfiles; only a build shows that they build (offline,
with the legacy builder this kind of machine has), that whisper.cpp really links OpenBLAS,
that the images work as uid 10001 on a read-only root filesystem without a network (as the
Kubernetes Job runs them), and that the model stage refuses a file whose checksum is wrong.

`scripts/images build` runs once per session (warm: seconds, the layer cache lives in the
project's cache; cold: several minutes). The images are built from the working tree with
the base images and the test copy of the model that scripts/images provides.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.media import JFK, MODELS
from tests.images import (
    CONTROLLER,
    IMAGES,
    LOCKED_DOWN,
    REPO_ROOT,
    RUNNER,
    RUNNER_NOMODEL,
    TEST_MODEL,
    TEST_MODEL_SHA256,
    Docker,
)

pytestmark = [pytest.mark.realnode, pytest.mark.timeout(3600)]


def without_colours(text: str) -> str:
    """The legacy builder colours a step's stderr and may split one line into many coloured
    pieces ("P\x1b[0m\x1b[91mr..."): compare the text without the colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_runner_runs_as_10001_read_only_without_network(docker: Docker) -> None:
    for image in (RUNNER_NOMODEL, RUNNER):
        # The image's own entrypoint and command (`dharma-jobrunner --help`).
        assert "run" in docker.run(image)
        assert "--job-id" in docker.run(image, "run", "--help")
    out = docker.run(
        RUNNER,
        "-c",
        "import os, _pywhispercpp, jobrunner.cli\n"
        "print(os.getuid(), os.getgid())\n"
        "try:\n"
        "    open('/opt/venv/x', 'w')\n"
        "except OSError as exc:\n"
        "    print(exc.strerror)\n",
        entrypoint="python",
    )
    assert out.splitlines() == ["10001 10001", "Read-only file system"]
    assert docker.inspect(RUNNER)["Config"]["User"] == "10001:10001"


def test_runner_ggml_blas_backend_links_openblas(docker: Docker) -> None:
    out = docker.run(
        RUNNER,
        "-c",
        "site=$(python -c 'import sysconfig; print(sysconfig.get_paths()[\"platlib\"])')"
        ' && ldd "$site/libggml-blas.so" "$site"/_pywhispercpp*.so',
        entrypoint="sh",
    )
    assert "not found" not in out, out
    assert "libopenblas.so" in out, out
    # The image's FFmpeg too (the runner's decoder), for the same locked-down user.
    assert "ffmpeg version" in docker.run(RUNNER, "-hide_banner", "-version", entrypoint="ffmpeg")


def test_runner_image_carries_the_verified_model(docker: Docker) -> None:
    out = docker.run(
        RUNNER,
        "-c",
        'echo "$WHISPER_MODEL" && sha256sum "$WHISPER_MODEL" && stat -c "%a %u" "$WHISPER_MODEL"',
        entrypoint="sh",
    )
    path, digest, mode = out.splitlines()
    assert path == "/models/ggml-base.bin"
    assert digest.split() == [TEST_MODEL_SHA256, path]
    assert mode == "444 0"
    labels = docker.inspect(RUNNER)["Config"]["Labels"]
    assert labels["io.dharma-stream.whisper-model-sha256"] == TEST_MODEL_SHA256
    assert labels["org.opencontainers.image.base.name"] == docker.bases["PYTHON_IMAGE"]
    # The image without a model has none, and no model stage ran for it.
    out = docker.run(RUNNER_NOMODEL, "-c", "ls /models 2>&1; echo $WHISPER_MODEL", entrypoint="sh")
    assert "No such file or directory" in out and out.rstrip().endswith("/models/ggml-base.bin")


def test_runner_image_transcribes_speech_with_its_model(docker: Docker) -> None:
    """whisper.cpp with OpenBLAS, the CPU variant for this CPU (loaded first, as the runner
    does) and the baked model, on jfk.wav, as the unprivileged user."""
    script = (
        "import json, os, wave, numpy as np\n"
        "from pywhispercpp.model import Model\n"
        "from jobrunner.backends import load_backends\n"
        "print(json.dumps(load_backends().__dict__))\n"
        "w = wave.open('/assets/jfk.wav')\n"
        "pcm = np.frombuffer(w.readframes(w.getnframes()), dtype='<i2')\n"
        "m = Model(os.environ['WHISPER_MODEL'], n_threads=2)\n"
        "audio = pcm.astype(np.float32) / 32768.0\n"
        "print(' '.join(s.text.strip() for s in m.transcribe(audio, language='en')))\n"
    )
    result = docker(
        "run", *LOCKED_DOWN, "-v", f"{JFK.parent}:/assets:ro", "--entrypoint", "python",
        RUNNER, "-c", script,
    )  # fmt: skip
    # whisper.cpp's log (stderr): the BLAS backend, not the plain CPU one, was chosen.
    assert "whisper_backend_init: using BLAS backend" in result.stderr, result.stderr
    backends, text = result.stdout.strip().lower().split("\n", 1)
    # A CPU variant was chosen for this CPU (containers share the host's): with AVX2, at least
    # the haswell one.
    chosen = json.loads(backends)["cpu"]
    assert chosen != "built-in", backends
    if " avx2 " in Path("/proc/cpuinfo").read_text():
        assert chosen not in ("x64", "sse42", "sandybridge"), backends
    assert json.loads(backends)["blas"] is True, backends
    assert "ask not what your country can do for you" in text, text


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def model_server() -> Iterator[str]:
    """shared/models over plain HTTP on 127.0.0.1 (the build runs with --network host)."""
    handler = functools.partial(_Quiet, directory=str(MODELS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_model_stage_rejects_a_wrong_checksum(docker: Docker, model_server: str) -> None:
    wrong = hashlib.sha256(b"not the model").hexdigest()
    result = docker(
        "build", "--network", "host", "--force-rm", "-f", str(REPO_ROOT / "Dockerfile.worker"),
        "--target", "model",
        "--build-arg", f"PYTHON_IMAGE={docker.bases['PYTHON_IMAGE']}",
        "--build-arg", f"DEBIAN_IMAGE={docker.bases['DEBIAN_IMAGE']}",
        "--build-arg", f"WHISPER_MODEL_BASE_URL={model_server}",
        "--build-arg", "WHISPER_MODEL_PROTOCOLS=http",
        "--build-arg", f"WHISPER_MODEL_SHA256={wrong}",
        "--build-arg", "WHISPER_MODEL_SHA1=",
        str(REPO_ROOT),
        check=False, timeout=1800,
    )  # fmt: skip
    output = without_colours(result.stdout + result.stderr)
    assert result.returncode != 0, output
    assert "ggml-base.bin: FAILED" in output, output
    assert f"SHA-256 mismatch, expected {wrong}, got {TEST_MODEL_SHA256}" in output, output


def test_model_stage_refuses_plain_http_by_default(docker: Docker, model_server: str) -> None:
    """Only the explicit WHISPER_MODEL_PROTOCOLS=http lets the download leave HTTPS."""
    result = docker(
        "build", "--network", "host", "--force-rm", "-f", str(REPO_ROOT / "Dockerfile.worker"),
        "--target", "model",
        "--build-arg", f"PYTHON_IMAGE={docker.bases['PYTHON_IMAGE']}",
        "--build-arg", f"DEBIAN_IMAGE={docker.bases['DEBIAN_IMAGE']}",
        "--build-arg", f"WHISPER_MODEL_BASE_URL={model_server}",
        "--build-arg", f"WHISPER_MODEL_SHA256={TEST_MODEL_SHA256}",
        "--build-arg", "WHISPER_MODEL_SHA1=",
        str(REPO_ROOT),
        check=False, timeout=1800,
    )  # fmt: skip
    output = without_colours(result.stdout + result.stderr)
    assert result.returncode != 0, output
    assert "Protocol" in output and "not supported or disabled" in output, output


def test_controller_runs_as_10001_read_only_without_network(docker: Docker) -> None:
    assert "migrate" in docker.run(CONTROLLER, "--help")
    out = docker.run(
        CONTROLLER,
        "-c",
        "import os, controller.cli, kubernetes, psycopg2\n"
        "print(os.getuid(), os.getgid())\n"
        "import importlib.util\n"
        "print(importlib.util.find_spec('pywhispercpp') is None)\n",
        entrypoint="python",
    )
    assert out.splitlines() == ["10001 10001", "True"]
    assert docker.inspect(CONTROLLER)["Config"]["User"] == "10001:10001"


def test_images_are_labelled_with_the_revision(docker: Docker) -> None:
    revision = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for image in (RUNNER_NOMODEL, RUNNER, CONTROLLER):
        labels = docker.inspect(image)["Config"]["Labels"]
        assert labels["org.opencontainers.image.revision"].startswith(revision), image
        assert labels["org.opencontainers.image.version"] == "0.1.0"


def test_test_model_is_the_file_scripts_images_serves() -> None:
    """The checksum the test build passes is that of shared/models/ggml-base.bin."""
    digest = hashlib.sha256(TEST_MODEL.read_bytes()).hexdigest()
    assert digest == TEST_MODEL_SHA256
    assert TEST_MODEL_SHA256 in IMAGES.read_text()
    assert Path(IMAGES).stat().st_mode & 0o111
