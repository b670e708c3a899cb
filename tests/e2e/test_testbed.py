"""Smoke tests proving the test control plane is real Kubernetes.

Why: every e2e test of the controller trusts that a Job here behaves as in
production: the real Job controller creates pods, the real scheduler binds
them, and pod outcomes reach the Job's conditions exactly as kubelet reports
them. These tests pin that down, plus the testbed's own tools (pod fates,
`kubectl logs`, restarting the API server).

Each pod carries both a real command that produces the outcome on a cluster
with containers (e.g. kind via DHARMA_TEST_KUBECONFIG) and the KWOK annotation
that simulates the same outcome on the testbed, so the assertions hold on both.
On kind these pods run on the real node (the fake nodes of its in-cluster KWOK
are tainted); a test that needs KWOK itself places its pod on a fake node.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from devtools.kwok import DELAY, EXIT_CODE, FATE, MESSAGE
from tests.testbed import (
    REPO_ROOT,
    Kube,
    fake_node_placement,
    fake_nodes,
    wait_until,
)

pytestmark = pytest.mark.e2e

IMAGE = "busybox:1.36"
# Short grace period so real containers (kind) that ignore SIGTERM stop quickly.
GRACE = 1


def pod_spec(
    command: list[str],
    *,
    image: str = IMAGE,
    restart_policy: str = "Never",
    resources: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A one-container pod spec named ``main``."""
    container: dict[str, Any] = {"name": "main", "image": image, "command": command}
    if resources:
        container["resources"] = resources
    return {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": GRACE,
        "containers": [container],
        **extra,
    }


def create_job(
    kube: Kube,
    namespace: str,
    name: str,
    command: list[str],
    *,
    annotations: dict[str, str] | None = None,
    resources: dict[str, Any] | None = None,
    pod: dict[str, Any] | None = None,
    **job_spec: Any,
) -> client.V1Job:
    """Create a Job (no retries unless ``backoffLimit`` is given); ``pod``: more fields of
    its pod spec."""
    body = client.V1Job.model_validate(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name},
            "spec": {
                "backoffLimit": 0,
                **job_spec,
                "template": {
                    "metadata": {"annotations": annotations or {}},
                    "spec": pod_spec(command, resources=resources, **(pod or {})),
                },
            },
        }
    )
    return client.BatchV1Api(kube.api_client).create_namespaced_job(namespace, body)


def create_pod(
    kube: Kube,
    namespace: str,
    name: str,
    spec: dict[str, Any],
    annotations: dict[str, str] | None = None,
) -> client.V1Pod:
    """Create a bare Pod."""
    body = client.V1Pod.model_validate(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": annotations or {}},
            "spec": spec,
        }
    )
    return client.CoreV1Api(kube.api_client).create_namespaced_pod(namespace, body)


def job_condition(kube: Kube, namespace: str, name: str, kind: str) -> client.V1JobCondition | None:
    """The Job's condition of that type if it is True."""
    job = client.BatchV1Api(kube.api_client).read_namespaced_job_status(name, namespace)
    for condition in (job.status and job.status.conditions) or []:
        if condition.type == kind and condition.status == "True":
            return condition
    return None


def wait_job_condition(
    kube: Kube, namespace: str, name: str, kind: str, timeout: float = 90
) -> client.V1JobCondition:
    return wait_until(
        lambda: job_condition(kube, namespace, name, kind),
        what=f"Job {namespace}/{name} condition {kind}",
        timeout=timeout,
    )


def job_pods(kube: Kube, namespace: str, name: str) -> list[client.V1Pod]:
    pods = client.CoreV1Api(kube.api_client).list_namespaced_pod(
        namespace, label_selector=f"batch.kubernetes.io/job-name={name}"
    )
    return list(pods.items)


def read_pod(kube: Kube, namespace: str, name: str) -> client.V1Pod:
    return client.CoreV1Api(kube.api_client).read_namespaced_pod_status(name, namespace)


def container_state(pod: client.V1Pod) -> client.V1ContainerState:
    """The state of the pod's only container (it must have been reported)."""
    assert pod.status is not None
    assert pod.status.container_statuses, f"no container status yet: {pod.status}"
    state = pod.status.container_statuses[0].state
    assert state is not None
    return state


def terminated(pod: client.V1Pod) -> client.V1ContainerStateTerminated:
    state = container_state(pod).terminated
    assert state is not None, f"container not terminated: {container_state(pod)}"
    return state


def pod_condition(pod: client.V1Pod, kind: str) -> client.V1PodCondition | None:
    for condition in (pod.status and pod.status.conditions) or []:
        if condition.type == kind:
            return condition
    return None


def test_job_completes_through_real_controllers(kube: Kube, kube_namespace: str) -> None:
    """Job controller creates the pod, the scheduler binds it, the node runs it."""
    create_job(kube, kube_namespace, "hello", ["sh", "-c", "echo hello"])

    complete = wait_job_condition(kube, kube_namespace, "hello", "Complete")
    assert complete.status == "True"

    [pod] = job_pods(kube, kube_namespace, "hello")
    owners = pod.metadata.owner_references if pod.metadata else None
    assert owners
    assert [(o.kind, o.name, o.controller) for o in owners] == [("Job", "hello", True)]
    assert pod.spec is not None
    assert pod.spec.node_name, "the scheduler did not bind the pod"
    if kube.is_testbed:
        assert pod.spec.node_name.startswith("kwok-node-")
    scheduled = pod_condition(pod, "PodScheduled")
    assert scheduled is not None
    assert scheduled.status == "True"
    assert pod.status is not None
    assert pod.status.phase == "Succeeded"
    state = terminated(pod)
    assert (state.exit_code, state.reason) == (0, "Completed")
    assert state.started_at is not None
    assert state.finished_at is not None


def test_oom_marker_fails_the_job_with_oomkilled(kube: Kube, kube_namespace: str) -> None:
    create_job(
        kube,
        kube_namespace,
        "oom",
        ["sh", "-c", "tail /dev/zero"],
        annotations={FATE: "oom"},
        resources={"limits": {"memory": "16Mi"}, "requests": {"memory": "16Mi"}},
    )

    failed = wait_job_condition(kube, kube_namespace, "oom", "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    [pod] = job_pods(kube, kube_namespace, "oom")
    assert pod.status is not None
    assert pod.status.phase == "Failed"
    state = terminated(pod)
    assert (state.exit_code, state.reason) == (137, "OOMKilled")


def test_fail_marker_reports_exit_code_and_message(kube: Kube, kube_namespace: str) -> None:
    """The exit code reaches podFailurePolicy; the message reaches the pod status."""
    message = "transcription failed: no audio stream"
    create_job(
        kube,
        kube_namespace,
        "fail",
        ["sh", "-c", f"printf '%s' '{message}' > /dev/termination-log; exit 42"],
        annotations={FATE: "fail", EXIT_CODE: "42", MESSAGE: message},
        backoffLimit=3,
        podFailurePolicy={
            "rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}}]
        },
    )

    failed = wait_job_condition(kube, kube_namespace, "fail", "Failed")
    assert failed.reason == "PodFailurePolicy"
    [pod] = job_pods(kube, kube_namespace, "fail")
    state = terminated(pod)
    assert (state.exit_code, state.reason, state.message) == (42, "Error", message)


def test_active_deadline_fails_the_job_with_deadline_exceeded(
    kube: Kube, kube_namespace: str
) -> None:
    """The Job controller kills the running pod; the node terminates and removes it."""
    create_job(
        kube,
        kube_namespace,
        "slow",
        ["sleep", "3600"],
        annotations={FATE: "external"},  # stays Running on the testbed
        activeDeadlineSeconds=2,
    )

    failed = wait_job_condition(kube, kube_namespace, "slow", "Failed")
    assert failed.reason == "DeadlineExceeded"
    wait_until(
        lambda: not job_pods(kube, kube_namespace, "slow"),
        what="the Job's pods to be deleted",
    )


def test_image_pull_error_stays_pending(kube: Kube, kube_namespace: str) -> None:
    create_pod(
        kube,
        kube_namespace,
        "bad-image",
        pod_spec(["true"], image="registry.invalid/dharma/no-such-image:0"),
        annotations={FATE: "image-pull-error"},
    )

    def backing_off() -> client.V1Pod | None:
        pod = read_pod(kube, kube_namespace, "bad-image")
        statuses = (pod.status and pod.status.container_statuses) or []
        waiting = statuses[0].state.waiting if statuses and statuses[0].state else None
        return pod if waiting and waiting.reason == "ImagePullBackOff" else None

    pod = wait_until(backing_off, what="ImagePullBackOff", timeout=120)
    assert pod.status is not None
    assert pod.status.phase == "Pending"
    waiting = container_state(pod).waiting
    assert waiting is not None
    assert waiting.message
    assert "registry.invalid/dharma/no-such-image:0" in waiting.message


@pytest.mark.parametrize(
    "unsatisfiable",
    [
        {"nodeSelector": {"dharma-stream.test/no-such-node": "true"}},
        {"resources": {"requests": {"cpu": "1000"}}},
    ],
    ids=["node-selector", "cpu-request"],
)
def test_unschedulable_pod_stays_pending(
    kube: Kube, kube_namespace: str, unsatisfiable: dict[str, Any]
) -> None:
    """Nothing simulates this: the real scheduler finds no node."""
    spec = pod_spec(["true"], resources=unsatisfiable.get("resources"))
    if "nodeSelector" in unsatisfiable:
        spec["nodeSelector"] = unsatisfiable["nodeSelector"]
    create_pod(kube, kube_namespace, "nowhere", spec)

    def unschedulable() -> client.V1Pod | None:
        pod = read_pod(kube, kube_namespace, "nowhere")
        condition = pod_condition(pod, "PodScheduled")
        ok = condition and condition.status == "False" and condition.reason == "Unschedulable"
        return pod if ok else None

    pod = wait_until(unschedulable, what="PodScheduled=False/Unschedulable")
    assert pod.spec is not None
    assert pod.spec.node_name is None
    assert pod.status is not None
    assert pod.status.phase == "Pending"


def test_kubectl_logs_returns_the_files_lines(
    kube: Kube, kube_namespace: str, tmp_path: Path
) -> None:
    lines = ["first line", "second: with punctuation", "third line"]
    script = "; ".join(f"echo '{line}'" for line in lines) + "; sleep 3600"
    create_pod(kube, kube_namespace, "talker", pod_spec(["sh", "-c", script]))

    def running() -> client.V1Pod | None:
        pod = read_pod(kube, kube_namespace, "talker")
        return pod if pod.status and pod.status.phase == "Running" else None

    pod = wait_until(running, what="pod Running")

    def logs() -> list[str]:
        result = kube.kubectl("logs", "-n", kube_namespace, "talker", "-c", "main", check=False)
        return result.stdout.splitlines() if result.returncode == 0 else []

    assert pod.spec is not None
    if pod.spec.node_name in kube.fake_nodes:  # a simulated container has no output
        if kube.is_testbed:
            # Without an attached file every container serves the default line.
            assert "simulated by kwok" in wait_until(lambda: " ".join(logs()), what="default logs")
        log_file = tmp_path / "talker.log"
        log_file.write_text("".join(f"{line}\n" for line in lines))
        kube.attach_logs(kube_namespace, "talker", "main", log_file)  # skips off the testbed

    assert wait_until(lambda: logs() == lines and lines, what=f"kubectl logs == {lines}")


class ConfigMapWatcher(threading.Thread):
    """A minimal informer: list, then watch from the list's resourceVersion;
    on a dropped stream resume from the last seen version; on 410 Gone relist.

    Why here: it is the loop every controller needs, and this test proves the
    testbed exercises it (a restart really cuts the stream).
    """

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True, name=f"watch-{namespace}")
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.seen: set[str] = set()
        self.connections = 0
        self.relists = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        version: str | None = None
        while not self.stopping.is_set():
            try:
                if version is None:
                    listing = self.core.list_namespaced_config_map(self.namespace)
                    assert listing.metadata is not None
                    version = listing.metadata.resource_version
                    self.seen.update(
                        cm.metadata.name for cm in listing.items if cm.metadata and cm.metadata.name
                    )
                    self.relists += 1
                self.connections += 1
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.core.list_namespaced_config_map,
                    self.namespace,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=600,
                    _request_timeout=(5, 300),
                )
                for event in stream:
                    if event["type"] == "ERROR":  # e.g. 410: the restarted server's cache
                        version = None  # starts after our version; relist
                        break
                    meta = event["object"].metadata
                    version = meta.resource_version
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.seen.add(meta.name)
                    if self.stopping.is_set():
                        return
            except ApiException as exc:
                if exc.status == 410:  # our version was compacted away: relist
                    version = None
                else:
                    time.sleep(0.2)
            except (urllib3.exceptions.HTTPError, OSError):
                time.sleep(0.2)  # API server unreachable: retry from `version`


def test_watch_survives_an_api_server_restart(kube: Kube, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client)

    def make(name: str) -> None:
        core.create_namespaced_config_map(
            kube_namespace, client.V1ConfigMap.model_validate({"metadata": {"name": name}})
        )

    watcher = ConfigMapWatcher(kube.api_client, kube_namespace)
    watcher.start()
    try:
        wait_until(lambda: watcher.relists, what="the initial list")
        make("before-restart")
        wait_until(lambda: "before-restart" in watcher.seen, what="event before the restart")
        connections = watcher.connections

        kube.restart_apiserver()
        make("after-restart")

        wait_until(
            lambda: "after-restart" in watcher.seen, what="event after the restart", timeout=120
        )
        assert watcher.connections > connections, "the restart did not cut the watch"
    finally:
        watcher.stopping.set()
        make("wake-the-watcher")  # the loop checks `stopping` after each event
        watcher.join(timeout=60)
    assert not watcher.is_alive()


def test_external_fate_the_test_writes_the_outcome(kube: Kube, kube_namespace: str) -> None:
    """A test can run the real program elsewhere and report its result as the pod's.

    KWOK must leave a terminal status alone; the Job controller must act on it. On a real
    node the kubelet owns the pod status, so the pod goes to a KWOK fake node.
    """
    kube.require_fates("writing a pod's outcome from the test")
    create_job(
        kube,
        kube_namespace,
        "outside",
        ["true"],
        annotations={FATE: "external", DELAY: "0s"},
        pod=fake_node_placement(),
    )

    def running() -> client.V1Pod | None:
        pods = job_pods(kube, kube_namespace, "outside")
        return pods[0] if pods and pods[0].status and pods[0].status.phase == "Running" else None

    pod = wait_until(running, what="the pod Running")
    assert pod.metadata is not None
    assert pod.metadata.name is not None
    started = container_state(pod).running
    assert started is not None
    message = "transcribed 3 segments"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.CoreV1Api(kube.api_client).patch_namespaced_pod_status(
        pod.metadata.name,
        kube_namespace,
        {
            "status": {
                "phase": "Succeeded",
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "PodCompleted"},
                    {"type": "ContainersReady", "status": "False", "reason": "PodCompleted"},
                ],
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": IMAGE,
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 0,
                                "reason": "Completed",
                                "message": message,
                                "startedAt": started.started_at.isoformat()
                                if started.started_at
                                else now,
                                "finishedAt": now,
                            }
                        },
                    }
                ],
            }
        },
    )

    wait_job_condition(kube, kube_namespace, "outside", "Complete")
    # A terminal pod matches no Stage, so KWOK leaves it alone. Proving a
    # negative needs a window: touch the pod (KWOK re-evaluates Stages on every
    # update) and watch it for longer than any Stage delay (1s by default).
    client.CoreV1Api(kube.api_client).patch_namespaced_pod(
        pod.metadata.name, kube_namespace, {"metadata": {"labels": {"touched": "yes"}}}
    )
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        after = read_pod(kube, kube_namespace, pod.metadata.name)
        assert after.status is not None
        assert after.status.phase == "Succeeded"
        state = terminated(after)
        assert (state.exit_code, state.reason, state.message) == (0, "Completed", message)
        time.sleep(0.25)


def test_eviction_is_a_disruption_the_pod_failure_policy_can_ignore(
    kube: Kube, kube_namespace: str
) -> None:
    """An evicted pod fails with DisruptionTarget, as kubelet reports it, so
    podFailurePolicy's onPodConditions rule applies and the Job goes on."""
    create_job(
        kube,
        kube_namespace,
        "evicted",
        ["sleep", "3600"],
        annotations={FATE: "external"},
        podFailurePolicy={
            "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]
        },
    )

    def running() -> client.V1Pod | None:
        pods = job_pods(kube, kube_namespace, "evicted")
        return pods[0] if pods and pods[0].status and pods[0].status.phase == "Running" else None

    first = wait_until(running, what="the first pod Running")
    assert first.metadata is not None
    assert first.metadata.name is not None
    first_name = first.metadata.name
    client.CoreV1Api(kube.api_client).create_namespaced_pod_eviction(
        first_name,
        kube_namespace,
        client.V1Eviction.model_validate(
            {"metadata": {"name": first_name, "namespace": kube_namespace}}
        ),
    )

    def replacement() -> client.V1Pod | None:
        pods = job_pods(kube, kube_namespace, "evicted")
        return next((p for p in pods if p.metadata and p.metadata.name != first_name), None)

    wait_until(replacement, what="a replacement pod")
    job = client.BatchV1Api(kube.api_client).read_namespaced_job_status("evicted", kube_namespace)
    assert job.status is not None
    assert not job.status.failed, "an ignored disruption must not count as a failure"
    assert job_condition(kube, kube_namespace, "evicted", "Failed") is None


def test_service_account_token_authenticates(kube: Kube, kube_namespace: str) -> None:
    """TokenRequest tokens work (signing keys, issuer), as a deployed controller needs."""
    core = client.CoreV1Api(kube.api_client)
    core.create_namespaced_service_account(
        kube_namespace, client.V1ServiceAccount.model_validate({"metadata": {"name": "robot"}})
    )
    request = client.AuthenticationV1TokenRequest.model_validate(
        {"spec": {"audiences": [], "expirationSeconds": 600}}
    )
    issued = core.create_namespaced_service_account_token("robot", kube_namespace, request)
    assert issued.status is not None

    admin = kube.api_client.configuration
    configuration = client.Configuration(
        host=admin.host,
        api_key={"authorization": f"Bearer {issued.status.token}"},
        ssl_ca_cert=admin.ssl_ca_cert,
    )
    with client.ApiClient(configuration) as robot:
        review = client.AuthenticationV1Api(robot).create_self_subject_review(
            client.V1SelfSubjectReview.model_validate({})
        )
    assert review.status is not None
    assert review.status.user_info is not None
    assert review.status.user_info.username == f"system:serviceaccount:{kube_namespace}:robot"


def test_a_pod_placed_on_the_fake_nodes_gets_its_simulated_fate(
    kube: Kube, kube_namespace: str
) -> None:
    """What the controller's tests rely on anywhere (RUNNER_NODE_SELECTOR/_TOLERATIONS):
    ``fake_node_placement`` puts a pod on a KWOK node, whose Stages play its fate (on kind
    the real command would exit 0, so exit 3 proves the fate was simulated)."""
    kube.require_fates("placing a pod on a fake node")
    create_job(
        kube,
        kube_namespace,
        "placed",
        ["true"],
        annotations={FATE: "fail", EXIT_CODE: "3", DELAY: "200ms"},
        pod=fake_node_placement(),
    )

    wait_job_condition(kube, kube_namespace, "placed", "Failed")
    [pod] = job_pods(kube, kube_namespace, "placed")
    assert pod.spec is not None
    assert pod.spec.node_name in kube.fake_nodes
    assert terminated(pod).exit_code == 3


def test_the_fake_node_manifest_is_what_fake_nodes_recognises(kube: Kube) -> None:
    """testbed/fake-nodes renders the nodes scripts/testbed and scripts/kind-e2e create: the
    API server accepts the tainted variant (kind's) as a new Node, and once Ready they are
    exactly what the fixtures count as fake nodes."""
    rendered = subprocess.run(
        [str(REPO_ROOT / "testbed" / "fake-nodes"), "2", "--taint", "--kubelet-version", "v1.2.3"],
        check=True,
        text=True,
        capture_output=True,
    ).stdout
    nodes: list[dict[str, Any]] = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert [n["metadata"]["name"] for n in nodes] == ["kwok-node-0", "kwok-node-1"]
    for node in nodes:
        assert node["spec"]["taints"] == [
            {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
        ]
        assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.2.3"
        node["metadata"]["name"] = f"dry-run-{node['metadata']['name']}"
        node["metadata"]["labels"]["kubernetes.io/hostname"] = node["metadata"]["name"]
    created = subprocess.run(
        ["kubectl", f"--kubeconfig={kube.kubeconfig}", "create", "--dry-run=server", "-o",
         "name", "-f", "-"],
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes}),
        check=True,
        text=True,
        capture_output=True,
    ).stdout.split()  # fmt: skip
    assert created == ["node/dry-run-kwok-node-0", "node/dry-run-kwok-node-1"]

    assert fake_nodes(nodes) == []  # not Ready: no KWOK plays them
    ready = [{"type": "Ready", "status": "True"}]
    for node in nodes:
        node["status"]["conditions"] = ready
    assert fake_nodes(nodes) == ["dry-run-kwok-node-0", "dry-run-kwok-node-1"]
    del nodes[0]["metadata"]["annotations"]["kwok.x-k8s.io/node"]
    nodes[1]["metadata"]["labels"]["type"] = "real"
    assert fake_nodes(nodes) == []
