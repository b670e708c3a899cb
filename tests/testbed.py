"""Pytest plugin: a real Kubernetes control plane for the end-to-end tests.

Why: the controller's value is how it behaves against Kubernetes itself (the Job
controller, the scheduler, watches that expire, pods that fail), so the e2e
tests talk to real kube-apiserver, kube-controller-manager, kube-scheduler and
etcd processes, with KWOK simulating the nodes and each pod's fate
(`scripts/testbed`, `testbed/stages/pod.yaml`).

The same tests run against any cluster: set ``DHARMA_TEST_KUBECONFIG`` to a
kubeconfig (e.g. a kind cluster with real containers) and the local testbed is
neither built nor started. Simulated pod fates need KWOK in that cluster too:
its in-cluster deployment with the Stages of ``testbed/stages/`` and fake nodes
from ``testbed/fake-nodes`` (``scripts/kind-e2e`` installs all three); pods that
must get a simulated fate are placed on those nodes (``fake_node_placement``).
Without fake nodes, tests that need fates skip. Testbed-only abilities
(restarting the API server, attaching local log files to simulated pods) skip
the calling test elsewhere.

Environment:
    DHARMA_TEST_KUBECONFIG  use this cluster instead of the local testbed
    DHARMA_TESTBED_KEEP     "1": leave a testbed this session started running
                            (one started by hand, or still used by another
                            test session, is always left running)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from devtools.testbed import REPO, SCRIPT, Sessions, run_script

REPO_ROOT = REPO
TESTBED = SCRIPT

# Label on every namespace the fixtures create, so strays are easy to find.
E2E_LABEL = "dharma-stream.test/e2e"

# Nodes simulated by KWOK (testbed/fake-node.yaml): KWOK manages the nodes with this
# annotation; pods select them by the label; on a cluster with real nodes they carry a
# NoSchedule taint with the annotation's key, which only pods meant for them tolerate.
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
FAKE_NODE_LABEL = ("type", "kwok")
FAKE_NODE_TAINT_KEY = "kwok.x-k8s.io/node"
NO_FAKE_NODES = (
    "needs simulated pod fates, but the cluster has no Ready KWOK fake node (annotation"
    " kwok.x-k8s.io/node=fake, label type=kwok): install KWOK in it with the Stages of"
    " testbed/stages/ and nodes from testbed/fake-nodes, as scripts/kind-e2e does"
)

_CRI_LINE = re.compile(r"^\S+ (stdout|stderr) [FP] ")

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None],
    *,
    what: str,
    timeout: float = 60.0,
    interval: float = 0.2,
) -> T:
    """Poll ``probe`` until it returns something truthy, and return that.

    Why: everything in Kubernetes is eventually consistent; tests must poll for
    the state they expect rather than sleep and hope. The timeout only bounds a
    failure, it is never an assertion about speed.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


def _cri_log(lines: list[str]) -> str:
    """Kubelet's on-disk log format, which KWOK parses when serving `kubectl logs`."""
    return "".join(
        f"2000-01-01T00:00:{i % 60:02d}.000000000Z stdout F {line}\n"
        for i, line in enumerate(lines)
    )


def fake_nodes(nodes: list[dict[str, Any]]) -> list[str]:
    """Names of the Ready nodes that KWOK simulates, among ``nodes`` (API objects as dicts).

    Why Ready: a fake node only turns and stays Ready while a KWOK controller plays it, so
    this tells whether pods placed there will really get their simulated fates.
    """
    key, value = FAKE_NODE_ANNOTATION
    label, label_value = FAKE_NODE_LABEL
    names = []
    for node in nodes:
        meta = node.get("metadata") or {}
        if (meta.get("annotations") or {}).get(key) != value:
            continue
        if (meta.get("labels") or {}).get(label) != label_value:
            continue
        conditions = (node.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
            names.append(meta["name"])
    return sorted(names)


def fake_node_placement() -> dict[str, Any]:
    """Pod spec fields that put a pod on a fake node: the node selector and a toleration
    of the fake nodes' taint (present on clusters with real nodes, absent on the testbed,
    where the toleration is simply unused)."""
    label, label_value = FAKE_NODE_LABEL
    return {
        "nodeSelector": {label: label_value},
        "tolerations": [{"key": FAKE_NODE_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }


@dataclass
class Kube:
    """The cluster under test and what a test may do to it."""

    kubeconfig: Path
    api_client: client.ApiClient
    is_testbed: bool
    log_dir: Path
    #: Ready KWOK fake nodes (every node of the testbed; on another cluster, those of an
    #: in-cluster KWOK): where pods get simulated fates.
    fake_nodes: list[str] = field(default_factory=list)
    _log_files: int = field(default=0, repr=False)
    _deleted_namespaces: list[str] = field(default_factory=list, repr=False)

    @property
    def simulates_fates(self) -> bool:
        """Whether pods placed with ``fake_node_placement`` get their testbed.dharma/* fates."""
        return bool(self.fake_nodes)

    def require_fates(self, what: str) -> None:
        """Skip the calling test (``what`` it is) unless the cluster simulates pod fates."""
        if not self.simulates_fates:
            pytest.skip(f"{what} {NO_FAKE_NODES}")

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster and capture its output."""
        return subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            text=True,
            capture_output=True,
        )

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver (etcd keeps the data); returns once it is ready.

        Why: a controller's watches must survive an API server restart, which
        only the local testbed can do on demand; elsewhere the test is skipped.
        """
        if not self.is_testbed:
            pytest.skip(
                "restarting the API server needs the local testbed (scripts/testbed"
                " restart-apiserver); another cluster's API server is not ours to restart"
            )
        run_script(["restart-apiserver"])

    def attach_logs(
        self, namespace: str, pod: str, container: str, path: Path, *, cri: bool = False
    ) -> None:
        """Make ``kubectl logs`` for that container return the lines of ``path``.

        Why: simulated pods have no real output; KWOK serves a file per
        container, declared by a KWOK ``Logs`` object named like the pod. A
        plain-text file is converted to kubelet's CRI log format (a copy, taken
        now); pass ``cri=True`` to serve a CRI-format file as it grows. Only
        the local testbed reads local files; elsewhere the test is skipped.
        """
        if not self.is_testbed:
            pytest.skip(
                "attaching log files to simulated pods needs the local testbed: its KWOK"
                " reads the files on this machine, an in-cluster KWOK cannot"
            )
        path = Path(path).resolve()
        if not cri:
            self._log_files += 1
            served = self.log_dir / f"{namespace}.{pod}.{container}.{self._log_files}.log"
            served.write_text(_cri_log(path.read_text().splitlines()))
            path = served
        api = client.CustomObjectsApi(self.api_client)
        group, version, plural = "kwok.x-k8s.io", "v1alpha1", "logs"
        entry = {"containers": [container], "logsFile": str(path)}
        try:
            current = cast(
                "dict[str, Any]",
                api.get_namespaced_custom_object(group, version, namespace, plural, pod),
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": f"{group}/{version}",
                "kind": "Logs",
                "metadata": {"name": pod, "namespace": namespace},
                "spec": {"logs": [entry]},
            }
            api.create_namespaced_custom_object(group, version, namespace, plural, body)
            return
        logs = [e for e in current["spec"]["logs"] if container not in e.get("containers", [])]
        current["spec"]["logs"] = [*logs, entry]
        api.replace_namespaced_custom_object(group, version, namespace, plural, pod, current)


def _api_client(kubeconfig: Path) -> client.ApiClient:
    """An API client for that kubeconfig (its current context)."""
    api_client: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig)
    )
    return api_client


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """The cluster for e2e tests: the local testbed (built and started on
    demand) or, with ``DHARMA_TEST_KUBECONFIG``, an existing cluster."""
    log_dir = tmp_path_factory.mktemp("pod-logs")
    external = os.environ.get("DHARMA_TEST_KUBECONFIG")
    if external:
        kubeconfig = Path(external)
        api_client = _api_client(kubeconfig)
        cluster = Kube(
            kubeconfig,
            api_client,
            is_testbed=False,
            log_dir=log_dir,
            fake_nodes=_list_fake_nodes(api_client),
        )
        yield cluster
        _wait_namespaces_deleted(cluster)
        api_client.close()  # type: ignore[no-untyped-call]
        return

    run_script(["build"])
    sessions = Sessions()
    kubeconfig = sessions.up()
    api_client = _api_client(kubeconfig)
    cluster = Kube(
        kubeconfig,
        api_client,
        is_testbed=True,
        log_dir=log_dir,
        fake_nodes=_list_fake_nodes(api_client),
    )
    assert cluster.fake_nodes, "the testbed's nodes are KWOK fake nodes (testbed/fake-nodes)"
    yield cluster
    _wait_namespaces_deleted(cluster)
    api_client.close()  # type: ignore[no-untyped-call]
    print(f"testbed: {sessions.release()}", file=sys.stderr)


def _list_fake_nodes(api_client: client.ApiClient) -> list[str]:
    """The cluster's Ready KWOK fake nodes (see ``fake_nodes``)."""
    label, label_value = FAKE_NODE_LABEL
    core: Any = client.CoreV1Api(api_client)  # Any: a raw response (_preload_content)
    response = core.list_node(label_selector=f"{label}={label_value}", _preload_content=False)
    nodes: list[dict[str, Any]] = json.loads(response.data)["items"]
    return fake_nodes(nodes)


@dataclass(frozen=True)
class RealNode:
    """The testbed's real kubelet node (``scripts/testbed node-info``): containers run
    through containerd and runc, so outcomes (OOM kills, termination messages, logs) are the
    kernel's and the kubelet's, not simulated.

    Its pods reach services the test runs on 127.0.0.1 at ``host_address`` and the same
    port, and the API server at the ``kubernetes`` Service (10.96.0.1:443). Only pods that
    select its label and tolerate its taint (``placement``) land there. Images cannot be
    pulled: use ``stress_image`` (static helpers: pause, sleep, echo, write, cat, exit,
    alloc, http; ``testbed/node/helper.c``) or import one (``import_image``).
    """

    name: str
    host_address: str
    pod_cidr: str
    containerd_address: str
    label: tuple[str, str]
    taint_key: str
    stress_image: str

    def placement(self) -> dict[str, Any]:
        """Pod spec fields that put a pod on this node, and nowhere else."""
        key, value = self.label
        return {
            "nodeSelector": {key: value},
            "tolerations": [{"key": self.taint_key, "operator": "Exists", "effect": "NoSchedule"}],
        }

    def node_exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (where pod IPs are reachable
        and 10.96.0.1:443 is the API server, as from a pod), capturing its output."""
        return subprocess.run(
            [str(TESTBED), "node-exec", *command],
            check=check,
            text=True,
            capture_output=True,
            timeout=120,
        )

    def import_image(self, tarball: Path) -> list[str]:
        """Import a docker-archive/OCI tarball into the node's containerd (skipped if it
        already has it); returns the image names."""
        out = run_script(["node-import", str(tarball)])
        return out.split()


@pytest.fixture(scope="session")
def real_node(kube: Kube) -> RealNode:
    """The testbed's real node; the calling tests skip, with the testbed's precise reason,
    where it cannot run (no cgroup memory controller, no root, DHARMA_TESTBED_REAL_NODE=0,
    ...) and on clusters other than the testbed."""
    if not kube.is_testbed:
        pytest.skip("needs the local testbed's real kubelet node (scripts/testbed node-info)")
    info = json.loads(run_script(["node-info"]))
    if "skip" in info:
        message = f"the testbed's real node is not running: {info['skip']}"
        if os.environ.get("CI"):  # CI runs on a machine that can: a skip would hide a failure
            pytest.fail(message)
        pytest.skip(message)
    key, _, value = info["label"].partition("=")
    return RealNode(
        name=info["name"],
        host_address=info["hostAddress"],
        pod_cidr=info["podCIDR"],
        containerd_address=info["containerdAddress"],
        label=(key, value),
        taint_key=info["taint"],
        stress_image=info["stressImage"],
    )


def _namespace_name(test_name: str) -> str:
    """A valid, unique namespace name that still says which test made it."""
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"e2e-{slug}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def kube_namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards.

    Deletion takes seconds (the namespace controller waits before it starts),
    so tests do not wait for it one by one; the session checks at its end that
    every namespace is really gone, i.e. that all their pods terminated.

    Why wait for the ``default`` ServiceAccount: ServiceAccount admission
    rejects pods until kube-controller-manager has created it, which would
    turn into slow Job-controller retries inside the test.
    """
    core = client.CoreV1Api(kube.api_client)
    name = _namespace_name(request.node.name)
    core.create_namespace(
        client.V1Namespace.model_validate(
            {"metadata": {"name": name, "labels": {E2E_LABEL: "true"}}}
        )
    )

    def has_default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_until(has_default_sa, what=f"ServiceAccount {name}/default")
    yield name

    core.delete_namespace(name)
    kube._deleted_namespaces.append(name)


def _wait_namespaces_deleted(kube: Kube, timeout: float = 180) -> None:
    """Fail loudly if a test namespace never goes away (e.g. a stuck pod)."""
    core = client.CoreV1Api(kube.api_client)

    def remaining() -> list[str]:
        existing = core.list_namespace(label_selector=f"{E2E_LABEL}=true").items
        names = {ns.metadata.name for ns in existing if ns.metadata}
        return [name for name in kube._deleted_namespaces if name in names]

    try:
        wait_until(lambda: not remaining(), what="test namespaces to be deleted", timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still present: {remaining()}") from None
