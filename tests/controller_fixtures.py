"""Fixtures for the controller tests (loaded through `pytest_plugins` in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kubernetes import client

from controller.jobspec import Instance, job_name
from controller.settings import ControllerSettings
from devtools.controller_helpers import ControllerProcess
from dharma_common.settings import DatabaseSettings, load_settings

if TYPE_CHECKING:  # imported by pytest as a plugin (below), so its asserts are rewritten
    from tests.testbed import Kube

#: The `kube` and `kube_namespace` fixtures (e2e); pytest loads each plugin once.
pytest_plugins = ["tests.testbed"]


@pytest.fixture
def controller_env(runner_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Environment of a local-executor controller against this test's PostgreSQL and
    WebDAV; the runners it starts inherit it (real jobrunner, weightless whisper model)."""
    env = dict(runner_env)
    env.pop("TERMINATION_MESSAGE_PATH", None)  # the executor sets one per attempt
    env.pop("SCRATCH_DIR", None)
    env.update(
        {
            "EXECUTOR": "local",
            "POD_NAME": f"test-controller-{uuid.uuid4().hex[:8]}",
            "LOCAL_SCRATCH_DIR": str(tmp_path / "controller-scratch"),
            "METRICS_PORT": "0",
            "POLL_INTERVAL_SECONDS": "1",
            "RETRY_BASE_SECONDS": "0.2",
            "RETRY_MAX_SECONDS": "1",
            "LOCAL_TERMINATION_GRACE_SECONDS": "2",
            "LOG_LEVEL": "INFO",
        }
    )
    return env


@pytest.fixture
def start_controller(
    tmp_path: Path,
) -> Iterator[Callable[..., ControllerProcess]]:
    """Start controllers; any still running at the end are stopped (SIGTERM, then SIGKILL)."""
    started: list[ControllerProcess] = []

    def start(env: dict[str, str], *args: str) -> ControllerProcess:
        proc = ControllerProcess(env, tmp_path / f"controller-{len(started)}.log", *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.alive():
            try:
                proc.stop(timeout=30)
            except Exception:
                proc.kill()


# ------------------------------------------------------------------ Kubernetes (e2e) ---


@dataclass
class KubeSetup:
    """A namespace ready for the controller: restricted Pod Security enforced, the runner's
    ConfigMap and Secret in place, and the environment of a kubernetes-executor controller."""

    kube: Kube
    namespace: str
    env: dict[str, str]
    batch: Any
    core: Any

    def jobs(self) -> list[dict[str, Any]]:
        response = self.batch.list_namespaced_job(self.namespace, _preload_content=False)
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items

    def job_names(self) -> list[str]:
        return sorted(j["metadata"]["name"] for j in self.jobs())

    def instance(self) -> Instance:
        """The installation a controller started with `env` serves: INSTANCE_NAME and the
        id in its database's dharma.installation (controller/jobspec.py `Instance`)."""
        return instance_of(self.env)

    def runner_name(self, job_id: int, attempt: int = 1) -> str:
        """The Job name of an attempt of a controller started with `env`."""
        settings = load_settings(ControllerSettings, **self.env)
        return job_name(settings, self.instance(), job_id, attempt)

    def pods(self, job_name: str | None = None) -> list[dict[str, Any]]:
        selector = f"batch.kubernetes.io/job-name={job_name}" if job_name else ""
        response = self.core.list_namespaced_pod(
            self.namespace, label_selector=selector, _preload_content=False
        )
        items: list[dict[str, Any]] = json.loads(response.data)["items"]
        return items


def instance_of(env: dict[str, str]) -> Instance:
    """The installation of a controller with this environment: INSTANCE_NAME (or its
    default) and the installation id of the database its DB_* settings name."""
    import psycopg2

    db = load_settings(DatabaseSettings, **{k: v for k, v in env.items() if k.startswith("DB_")})
    with contextlib.closing(psycopg2.connect(**db.connect_kwargs("tests"))) as conn, conn:
        cur = conn.cursor()
        cur.execute("SELECT id FROM dharma.installation")
        (installation_id,) = cur.fetchone()
    name = env.get("INSTANCE_NAME") or ControllerSettings.model_fields["INSTANCE_NAME"].default
    return Instance(str(name), uuid.UUID(str(installation_id)))


def runner_placement_env() -> dict[str, str]:
    """Controller settings that put its runner pods on KWOK's fake nodes (harmless on the
    testbed, whose nodes all are; needed on a cluster with real nodes too)."""
    from tests.testbed import fake_node_placement  # loaded as a plugin by now (see above)

    placement = fake_node_placement()
    return {
        "RUNNER_NODE_SELECTOR": json.dumps(placement["nodeSelector"]),
        "RUNNER_TOLERATIONS": json.dumps(placement["tolerations"]),
    }


#: The runner's settings that go into its Secret, not its ConfigMap.
RUNNER_SECRET_KEYS = ("DB_PASSWORD", "WEBDAV_PASSWORD")


def prepare_runner_namespace(core: Any, namespace: str, runner_env: dict[str, str]) -> None:
    """Enforce the `restricted` Pod Security Standard on the namespace (so the API server
    rejects any runner pod of ours that is not hardened) and create the runner's ConfigMap
    and Secret from `runner_env`, the passwords in the Secret only (as the chart does)."""
    restricted = {f"pod-security.kubernetes.io/{mode}": "restricted"
                  for mode in ("enforce", "warn", "audit")}  # fmt: skip
    core.patch_namespace(namespace, {"metadata": {"labels": restricted}})
    config = {k: v for k, v in runner_env.items() if k not in RUNNER_SECRET_KEYS}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "dharma-stream-runner"}, "data": config}
    )
    core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "dharma-stream"},
         "stringData": {k: runner_env[k] for k in RUNNER_SECRET_KEYS}},
    )  # fmt: skip


def kube_controller_env(kube: Kube, namespace: str, db_env: dict[str, str]) -> dict[str, str]:
    """The environment of a Kubernetes-executor controller run by a test as a local process
    against `namespace`: this process's environment without its DB_/WEBDAV_ settings, the
    test's database, fast polls and retries, no metrics port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "WEBDAV_"))}
    env.update(db_env)
    env.update(
        {
            "EXECUTOR": "kubernetes",
            "KUBECONFIG": str(kube.kubeconfig),
            "NAMESPACE": namespace,
            "POD_NAME": f"test-controller-{uuid.uuid4().hex[:8]}",
            "METRICS_PORT": "0",
            "POLL_INTERVAL_SECONDS": "1",
            "RETRY_BASE_SECONDS": "0.2",
            "RETRY_MAX_SECONDS": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
    )
    return env


@pytest.fixture
def kube_setup(
    kube: Kube, kube_namespace: str, runner_env: dict[str, str], tmp_path: Path
) -> KubeSetup:
    # Any: plain dict bodies and raw JSON responses, as the controller itself uses.
    # The runner never runs in these tests: KWOK plays each pod's fate from the
    # testbed.dharma/* annotations. On a real node (kind) the runner image would run against
    # services it cannot reach from here, so runner pods go to KWOK's fake nodes (every node
    # of the testbed; an in-cluster KWOK's elsewhere), and without any the tests skip.
    kube.require_fates("the controller's e2e tests")
    core: Any = client.CoreV1Api(kube.api_client)
    batch: Any = client.BatchV1Api(kube.api_client)
    runner_config = {
        k: v for k, v in runner_env.items()
        if k.startswith(("DB_", "WEBDAV_", "WHISPER_", "HTTP_", "PROGRESS_"))
    }  # fmt: skip
    prepare_runner_namespace(core, kube_namespace, runner_config)
    db_env = {k: runner_env[k] for k in runner_env if k.startswith("DB_")}
    env = kube_controller_env(kube, kube_namespace, db_env)
    env.update(
        {
            "RUNNER_IMAGE": "registry.invalid/dharma/jobrunner:test",
            "RUNNER_CPU_REQUEST": "10m",
            "RUNNER_MEMORY_REQUEST": "16Mi",
            "RUNNER_MEMORY_LIMIT": "256Mi",
            "RUNNER_MEMORY_LIMIT_MAX": "512Mi",
            # The runner's ephemeral-storage request: small, so that 40 chaos runners fit
            # on KWOK's nodes (100Gi each) as they would on a cluster sized for them.
            "RUNNER_SCRATCH_SIZE": "256Mi",
            "LEASE_DURATION_SECONDS": "3",
        }
    )
    env.update(runner_placement_env())
    return KubeSetup(kube, kube_namespace, env, batch, core)
