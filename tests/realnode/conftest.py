"""Fixtures for the real-pod tests: the locally built images on the test control plane's real
kubelet node, and the services the runner pods reach from there.

Why this exists beside the KWOK suites: KWOK lets us decide what "OOM-killed", "deadline
exceeded", a termination message or `kubectl logs` look like; here the kubelet, containerd,
runc and the kernel decide, running the images users install (`scripts/images` builds them
exactly as `docker build` would, `scripts/testbed` imports them into the node's containerd).

The node's pods reach the test's PostgreSQL and WsgiDAV (both on 127.0.0.1) at the node's
host address and the same port (`scripts/testbed node-info`), and the API server at the
`kubernetes` Service address, as in any cluster. Nothing is mocked.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from controller.jobspec import job_name
from controller.settings import ControllerSettings
from devtools.services import Database, WebDAVServer
from dharma_common.settings import load_settings
from tests.conftest import Queue
from tests.controller_fixtures import instance_of, kube_controller_env, prepare_runner_namespace
from tests.images import CONTROLLER, IMAGES, RUNNER, Docker
from tests.testbed import Kube, RealNode


@pytest.fixture(scope="session")
def real_images(real_node: RealNode, docker: Docker) -> dict[str, str]:
    """The images as users build them (`scripts/images build`, the `docker` fixture),
    imported into the node's containerd (an image the node already has costs a digest
    comparison)."""
    for image in (RUNNER, CONTROLLER):
        with tempfile.NamedTemporaryFile(suffix=".tar") as tarball:
            subprocess.run([str(IMAGES), "save", image], stdout=tarball, check=True)
            real_node.import_image(Path(tarball.name))
    return {"runner": RUNNER, "controller": CONTROLLER}


@dataclass
class RealSetup:
    """A restricted namespace whose runner pods run the real runner image on the real node,
    against this test's database and WebDAV; `env` is a kubernetes-executor controller's."""

    kube: Kube
    node: RealNode
    namespace: str
    env: dict[str, str]
    pod_env: dict[str, str]
    batch: Any
    core: Any

    def runner_name(self, job_id: int, attempt: int = 1) -> str:
        """The Job name of an attempt of a controller started with `env` (its installation:
        INSTANCE_NAME and its database's installation id)."""
        settings = load_settings(ControllerSettings, **self.env)
        return job_name(settings, instance_of(self.env), job_id, attempt)

    def pods(self, job_name: str) -> list[dict[str, Any]]:
        response = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=f"batch.kubernetes.io/job-name={job_name}",
            _preload_content=False,
        )
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def job(self, name: str) -> dict[str, Any] | None:
        response = self.batch.list_namespaced_job(
            self.namespace, field_selector=f"metadata.name={name}", _preload_content=False
        )
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items[0] if items else None

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kube.kubectl("-n", self.namespace, *args, check=check)

    def state_of(self, job_name: str) -> str:
        """What a failed wait needs to say: the Job's conditions, each pod's phase and
        container state, and the runner's last log lines."""
        job = self.job(job_name)
        lines = [f"job {job_name}: {job['status'] if job else 'absent'}"]
        for pod in self.pods(job_name):
            status = pod["status"]
            states = [c.get("state") for c in status.get("containerStatuses", [])]
            lines.append(f"pod {pod['metadata']['name']}: {status.get('phase')} {states}")
        logs = self.kubectl("logs", f"job/{job_name}", "--tail=5", check=False)
        return "\n".join([*lines, logs.stdout.strip() or logs.stderr.strip()])


def pod_services_env(node: RealNode, db: Database, dav: WebDAVServer) -> dict[str, str]:
    """DB_* and WEBDAV_* as a pod on the real node must use them (the node's host address,
    same ports), secrets included."""
    env = {**db.env(), **dav.env()}
    env["DB_HOST"] = node.host_address
    env["WEBDAV_BASE_URL"] = f"http://{node.host_address}:{dav.port}"
    return env


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The runner container's terminated state, once the kubelet reported it."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("terminated")
        if state:
            return dict(state)
    return None


@pytest.fixture
def real_setup(
    kube: Kube,
    kube_namespace: str,
    real_node: RealNode,
    real_images: dict[str, str],
    db: Database,
    dav: WebDAVServer,
) -> RealSetup:
    core: Any = client.CoreV1Api(kube.api_client)
    batch: Any = client.BatchV1Api(kube.api_client)
    pod_env = pod_services_env(real_node, db, dav)
    runner_env = {
        **pod_env, "WHISPER_LANGUAGE": "en", "WHISPER_THREADS": "2",
        "PROGRESS_INTERVAL_SECONDS": "0.5",
    }  # fmt: skip
    prepare_runner_namespace(core, kube_namespace, runner_env)
    placement = real_node.placement()
    env = kube_controller_env(kube, kube_namespace, db.env())
    env.update(
        {
            "RUNNER_IMAGE": real_images["runner"],
            "RUNNER_IMAGE_PULL_POLICY": "Never",
            "RUNNER_CPU_REQUEST": "100m",
            "RUNNER_CPU_LIMIT": "2",
            "RUNNER_MEMORY_REQUEST": "64Mi",
            "RUNNER_MEMORY_LIMIT": "1Gi",
            "RUNNER_MEMORY_LIMIT_MAX": "1Gi",
            "RUNNER_SCRATCH_SIZE": "2Gi",
            "RUNNER_NODE_SELECTOR": json.dumps(placement["nodeSelector"]),
            "RUNNER_TOLERATIONS": json.dumps(placement["tolerations"]),
        }
    )
    return RealSetup(kube, real_node, kube_namespace, env, pod_env, batch, core)


@pytest.fixture
def talk(queue: Queue) -> Callable[..., tuple[int, uuid.UUID]]:
    """Enqueue a generated talk (`devtools/media.py` kind): returns (job id, media id)."""

    def add(kind: str = "audio_aac_m4a", **media: Any) -> tuple[int, uuid.UUID]:
        media_id = queue.add_media(kind, **media)
        return queue.enqueue(media_id), media_id

    return add
