"""Pytest plugin: the project's container images, built once per session with
`scripts/images` (a dockerd of its own; see that script for why and how).

Used by tests/deploy/test_images.py (the images themselves) and tests/realnode (the images
on the testbed's real kubelet node). Warm, the build takes seconds (the layer cache lives in
the project's cache); cold, several minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools.media import MODELS

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT / "scripts" / "images"
RUNNER = "dharma-stream/jobrunner:dev"
RUNNER_NOMODEL = "dharma-stream/jobrunner:dev-nomodel"
CONTROLLER = "dharma-stream/controller:dev"
TEST_MODEL = MODELS / "ggml-base.bin"
TEST_MODEL_SHA256 = "c0db470711f9496ec80feedb59b0916f10a0c301218e7254a61e7d3d1890dc6d"
#: What the Kubernetes Job's securityContext imposes (deploy/helm): never root, nothing
#: written outside the emptyDir, and here no network at all.
LOCKED_DOWN = ["--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges"]  # fmt: skip


@dataclass(frozen=True)
class Docker:
    """The docker CLI against scripts/images' daemon."""

    bases: dict[str, str]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(IMAGES), "docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def run(self, image: str, *command: str, entrypoint: str | None = None) -> str:
        """Run `command` in `image`, locked down; its stdout."""
        options = [*LOCKED_DOWN, *(["--entrypoint", entrypoint] if entrypoint else [])]
        return self("run", *options, image, *command).stdout

    def inspect(self, image: str) -> dict[str, Any]:
        result = json.loads(self("image", "inspect", image).stdout)
        assert isinstance(result, list)
        first = result[0]
        assert isinstance(first, dict)
        return first


def _images(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(IMAGES), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="session")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    """The three images, built once. `scripts/images hold` keeps the daemon up for the session
    and, once terminated, stops it if it started it and nothing else uses it any more."""
    log = tmp_path_factory.mktemp("images") / "hold.log"
    with log.open("w") as stderr:
        hold = subprocess.Popen(
            [str(IMAGES), "hold"], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    assert hold.stdout is not None
    if hold.stdout.readline().strip() != "ready":
        hold.wait(timeout=120)
        reason = log.read_text().strip()
        cannot = "dockerd exited while starting" in reason or "dockerd did not answer" in reason
        if cannot and not os.environ.get("CI"):  # CI's machine can: there it is a failure
            pytest.skip(f"dockerd cannot start on this machine: {reason[-1500:]}")
        pytest.fail(f"scripts/images hold failed:\n{reason}")
    try:
        build = _images("build", timeout=3600)
        assert build.returncode == 0, build.stdout + build.stderr
        bases = _images("bases", timeout=900)
        assert bases.returncode == 0, bases.stderr
        pairs = [line.partition("=") for line in bases.stdout.splitlines()]
        yield Docker(bases={key: value for key, _, value in pairs if value})
    finally:
        hold.terminate()
        # It stops the daemon only once other users are done: don't wait for them.
        with contextlib.suppress(subprocess.TimeoutExpired):
            hold.wait(timeout=30)
        hold.stdout.close()
