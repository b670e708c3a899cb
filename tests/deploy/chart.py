"""Helpers for the chart and image tests: find `helm`, render the chart, read what it rendered.

Why a real `helm`: the chart is only correct if Helm itself renders it (template functions,
values.schema.json validation, hooks, NOTES). The binary is the one the test control plane
builds (`scripts/testbed build`, run by `scripts/bootstrap`), pinned in testbed/versions.env.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.settings import ControllerSettings
from devtools.cache import cache_dir
from dharma_common.settings import load_settings
from jobrunner.settings import RunnerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "deploy" / "helm" / "dharma-stream"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
KIND_MANIFESTS = REPO_ROOT / "deploy" / "kind"

Manifest = dict[str, Any]

#: Where runners may connect: required while networkPolicy.enabled (the default) is on.
NETWORK_SET = (
    "networkPolicy.databaseCidrs={10.20.0.5/32}",
    "networkPolicy.webdav.cidrs={203.0.113.10/32}",
)
#: Values that make a default install configured (connection settings have no defaults).
MINIMAL_SET = (
    "database.host=postgres.example.internal",
    "database.user=dharma",
    "webdav.baseUrl=https://dav.example.org/media",
    *NETWORK_SET,
)


def helm_binary() -> Path:
    """The `helm` to test with: $HELM, else PATH, else the testbed's build cache.

    Missing helm fails under CI (bootstrap must have built it) and skips elsewhere.
    """
    candidates: list[Path] = []
    if os.environ.get("HELM"):
        candidates.append(Path(os.environ["HELM"]))
    on_path = shutil.which("helm")
    if on_path:
        candidates.append(Path(on_path))
    testbed = cache_dir() / "testbed"
    bin_dir_file = testbed / "run" / "bin-dir"
    if bin_dir_file.is_file():
        candidates.append(Path(bin_dir_file.read_text().strip()) / "helm")
    built = [p / "bin" / "helm" for p in testbed.glob("k8s-*") if (p / "stamp").exists()]
    candidates.extend(sorted(built, key=lambda p: p.stat().st_mtime, reverse=True))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = "no helm binary: run scripts/bootstrap (scripts/testbed build) or set HELM"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def helm(
    *args: str, check: bool = True, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm with an isolated cache/config (no user repositories or plugins leak in)."""
    home = Path(tempfile.gettempdir()) / f"dharma-stream-helm-{os.getuid()}"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    extra = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
    result = subprocess.run(
        [str(helm_binary()), *args, *extra], capture_output=True, text=True, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def values_args(values_files: Iterable[Path] = (), set_values: Iterable[str] = ()) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["-f", str(path)]
    for item in set_values:
        args += ["--set", item]
    return args


def render(
    values_files: Sequence[Path] = (),
    set_values: Sequence[str] = (),
    *,
    release: str = "t",
    namespace: str = "dharma",
) -> list[Manifest]:
    """`helm template` (hooks included) parsed into manifests."""
    result = helm(
        "template", release, str(CHART), "--namespace", namespace,
        *values_args(values_files, set_values),
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(manifests: Sequence[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    """The one manifest of that kind (whose name ends with `name_suffix`)."""
    found = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"].endswith(name_suffix)
    ]
    assert len(found) == 1, (
        f"expected one {kind} *{name_suffix}, got {[m['metadata']['name'] for m in found]}"
    )
    return found[0]


def kinds(manifests: Sequence[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)


def controller_env(manifests: Sequence[Manifest]) -> dict[str, str]:
    """The controller ConfigMap's data: exactly the environment of `dharma-controller run`."""
    data: dict[str, str] = find(manifests, "ConfigMap", "-controller")["data"]
    return data


def runner_env(manifests: Sequence[Manifest]) -> dict[str, str]:
    data: dict[str, str] = find(manifests, "ConfigMap", "-runner")["data"]
    return data


def controller_settings(manifests: Sequence[Manifest]) -> ControllerSettings:
    """ControllerSettings parsed (and validated) from the rendered ConfigMap."""
    return load_settings(ControllerSettings, **controller_env(manifests))


def runner_settings(manifests: Sequence[Manifest], **secrets: str) -> RunnerSettings:
    return load_settings(RunnerSettings, **runner_env(manifests), **secrets)


def pod_specs(manifests: Sequence[Manifest]) -> dict[str, Manifest]:
    """Every pod spec the chart renders (Deployments' and Jobs' templates), by object name."""
    specs: dict[str, Manifest] = {}
    for m in manifests:
        if m["kind"] in {"Deployment", "Job", "StatefulSet", "DaemonSet"}:
            specs[f"{m['kind']}/{m['metadata']['name']}"] = m["spec"]["template"]["spec"]
    return specs


def secret_values(manifests: Sequence[Manifest]) -> dict[str, str]:
    """Decoded data of every Secret the chart renders."""
    values: dict[str, str] = {}
    for m in manifests:
        if m["kind"] == "Secret":
            for key, encoded in (m.get("data") or {}).items():
                values[f"{m['metadata']['name']}/{key}"] = base64.b64decode(encoded).decode()
    return values
