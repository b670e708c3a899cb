"""The real jobrunner, run from the pod spec the controller created.

KWOK has no containers, so the test plays kubelet for one pod (fate `external`: KWOK marks it
Running and leaves it alone): it reads the pod's own command and environment from the API —
resolving `envFrom` ConfigMap/Secret references and `valueFrom` keys through the API too —
runs that command as a local process against the real PostgreSQL and WsgiDAV, then writes the
outcome back as the pod's status (terminated, exit code, termination message). The Job
controller, our controller and the database then see a real run end to end.

Translations a local process needs, and nothing else: the pod's emptyDir mount paths become
local directories, its terminationMessagePath a local file (TERMINATION_MESSAGE_PATH), PATH
and PYTHONPATH come from the test process, and `dharma-jobrunner` is invoked as
`python -m jobrunner` when the console script is not installed (same entry point).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.controller_helpers import ControllerProcess, eventually
from devtools.kwok import FATE
from tests.conftest import Queue
from tests.controller_fixtures import KubeSetup
from tests.e2e.test_controller_outcomes import fate, finished

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def _read(setup: KubeSetup, kind: str, name: str) -> dict[str, str]:
    """data of a ConfigMap or (decoded) Secret, through the API."""
    if kind == "configMap":
        raw = setup.core.read_namespaced_config_map(name, setup.namespace, _preload_content=False)
        data: dict[str, str] = json.loads(raw.data).get("data") or {}
        return data
    raw = setup.core.read_namespaced_secret(name, setup.namespace, _preload_content=False)
    encoded = json.loads(raw.data).get("data") or {}
    return {k: base64.b64decode(v).decode() for k, v in encoded.items()}


def pod_environment(setup: KubeSetup, container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as kubelet would build it (envFrom, then env)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(_read(setup, "configMap", source["configMapRef"]["name"]))
        if "secretRef" in source:
            env.update(_read(setup, "secret", source["secretRef"]["name"]))
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
        elif ref := (item.get("valueFrom") or {}).get("configMapKeyRef"):
            env[item["name"]] = _read(setup, "configMap", ref["name"])[ref["key"]]
        elif ref := (item.get("valueFrom") or {}).get("secretKeyRef"):
            env[item["name"]] = _read(setup, "secret", ref["name"])[ref["key"]]
    return env


def play_kubelet(setup: KubeSetup, pod: dict[str, Any], workdir: Path) -> tuple[int, str]:
    """Run the pod's container as a local process; report its outcome as the pod status."""
    spec = pod["spec"]
    (container,) = spec["containers"]
    env = pod_environment(setup, container)
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        assert "emptyDir" in volumes[mount["name"]], "only emptyDir volumes are expected"
        local = workdir / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        env = {k: v.replace(mount["mountPath"], str(local)) for k, v in env.items()}
    termination = workdir / "termination-log"
    env["TERMINATION_MESSAGE_PATH"] = str(termination)
    env["PATH"] = os.environ["PATH"]
    env["PYTHONPATH"] = setup.env["PYTHONPATH"]
    command = [*container.get("command", []), *container.get("args", [])]
    if shutil.which(command[0]) is None and command[0] == "dharma-jobrunner":
        command = [sys.executable, "-m", "jobrunner", *command[1:]]
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    result = subprocess.run(command, env=env, capture_output=True, timeout=150, check=False)
    message = termination.read_text().strip() if termination.exists() else ""
    state = {
        "exitCode": result.returncode,
        "reason": "Completed" if result.returncode == 0 else "Error",
        "startedAt": started,
        "finishedAt": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if message:
        state["message"] = message
    previous = pod["status"]["containerStatuses"][0]
    status = {
        "phase": "Succeeded" if result.returncode == 0 else "Failed",
        "containerStatuses": [{
            "name": container["name"], "image": previous["image"],
            "imageID": previous.get("imageID", ""), "containerID": previous.get("containerID"),
            "ready": False, "started": False, "restartCount": 0,
            "state": {"terminated": state},
        }],
    }  # fmt: skip
    setup.core.patch_namespaced_pod_status(
        pod["metadata"]["name"], setup.namespace, {"status": status}
    )
    return result.returncode, message


@pytest.mark.parametrize("kind", ["audio_wav", "garbage"])
def test_real_jobrunner_from_the_created_pod_spec(
    kind: str,
    queue: Queue,
    kube_setup: KubeSetup,
    start_controller: Callable[..., ControllerProcess],
    tmp_path: Path,
) -> None:
    media_id = queue.add_media(kind)
    job_id = queue.enqueue(media_id)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})})
    name = kube_setup.runner_name(job_id, 1)

    def running_pod() -> dict[str, Any] | None:
        pods = kube_setup.pods(name)
        return pods[0] if pods and pods[0]["status"].get("phase") == "Running" else None

    pod = eventually(running_pod, "the runner pod to be Running")
    code, message = play_kubelet(kube_setup, pod, tmp_path / "pod")
    done = eventually(lambda: finished(queue, job_id), "the outcome to be recorded")
    if kind == "audio_wav":
        assert code == 0
        assert (done["status"], done["attempts"], done["error_message"]) == ("completed", 1, None)
        assert queue.row("SELECT result_attempt FROM dharma.stt_jobs WHERE id = %s", job_id)[0] == 1
        duration = queue.row(
            "SELECT duration_seconds FROM dharma.media_files WHERE id = %s", media_id
        )[0]
        assert duration and duration > 10
        assert list(queue.dav.root.rglob("playlist.m3u8"))
    else:
        assert code == 10
        assert (done["status"], done["failure_reason"]) == ("failed", "runner_error_permanent")
        assert done["error_message"] == message and "not readable media" in message
