"""The testbed's real node: a kubelet running containers through containerd and runc.

Why: KWOK lets the tests decide what an OOM kill, a termination message or `kubectl logs`
look like; on the real node the kernel, runc and the kubelet decide. These tests pin down
what the real-node tests of the controller rely on: only pods that ask for the node land
there, a memory limit is a real OOM kill, the termination message file and the container's
output reach the API, and a pod reaches the test's own services on 127.0.0.1 (at the node's
host address, same port) and the API server at the `kubernetes` Service, as in a cluster.

The pods run ``stress_image``: one static C program (``testbed/node/helper.c``) with applets
(``echo``, ``write``, ``exit``, ``alloc``, ``http``...), as no image can be pulled here.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kubernetes import client

from tests.testbed import Kube, RealNode, wait_until

pytestmark = [pytest.mark.realnode, pytest.mark.e2e]

#: The `kubernetes` Service, as pods see it (KUBERNETES_SERVICE_HOST/PORT).
API_SERVICE = ("10.96.0.1", 443)


def pod(node: RealNode, name: str, command: list[str], **container: Any) -> dict[str, Any]:
    """A one-shot pod of the stress image on the real node (``placement``)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": node.stress_image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    **container,
                }
            ],
            **node.placement(),
        },
    }


def core_api(kube: Kube) -> Any:
    """CoreV1Api, typed Any: the tests read raw JSON (``_preload_content=False``)."""
    return client.CoreV1Api(kube.api_client)


def read_pod(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    response = core_api(kube).read_namespaced_pod(name, namespace, _preload_content=False)
    pod: dict[str, Any] = json.loads(response.data)
    return pod


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """The container's terminated state, once the kubelet reported it."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        state = (status.get("state") or {}).get("terminated")
        if state:
            return dict(state)
    return None


def run_to_end(kube: Kube, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Create the pod and return it once its container terminated."""
    name = body["metadata"]["name"]
    core_api(kube).create_namespaced_pod(namespace, body)

    def ended() -> dict[str, Any] | None:
        current = read_pod(kube, namespace, name)
        return current if terminated(current) else None

    return wait_until(ended, what=f"pod {name} to terminate", timeout=120)


def end_state(kube: Kube, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """Run the pod to its end and return its container's terminated state."""
    state = terminated(run_to_end(kube, namespace, body))
    assert state is not None
    return state


def logs(kube: Kube, namespace: str, name: str) -> str:
    """``kubectl logs``: the API server asks the node's kubelet, which reads the CRI log."""
    return kube.kubectl("logs", "-n", namespace, name).stdout


def test_only_pods_tolerating_the_taint_land_on_the_real_node(
    kube: Kube, kube_namespace: str, real_node: RealNode
) -> None:
    intolerant = pod(real_node, "intolerant", ["/bin/echo", "never runs"])
    intolerant["spec"].pop("tolerations")
    core_api(kube).create_namespaced_pod(kube_namespace, intolerant)

    def unschedulable() -> dict[str, Any] | None:
        current = read_pod(kube, kube_namespace, "intolerant")
        for condition in current.get("status", {}).get("conditions") or []:
            if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
                return dict(condition)
        return None

    condition = wait_until(unschedulable, what="the intolerant pod to be Unschedulable")
    assert "untolerated taint" in condition.get("message", ""), condition
    ended = run_to_end(kube, kube_namespace, pod(real_node, "tolerant", ["/bin/echo", "ran"]))
    assert ended["spec"]["nodeName"] == real_node.name
    pod_ip = ipaddress.ip_address(ended["status"]["podIP"])
    assert pod_ip in ipaddress.ip_network(real_node.pod_cidr), pod_ip
    state = terminated(ended)
    assert state is not None and (state["exitCode"], state["reason"]) == (0, "Completed"), state
    assert "nodeName" not in read_pod(kube, kube_namespace, "intolerant")["spec"]


def test_memory_limit_is_a_real_oom_kill(
    kube: Kube, kube_namespace: str, real_node: RealNode
) -> None:
    body = pod(
        real_node,
        "hog",
        ["/bin/alloc", "256"],
        resources={"limits": {"memory": "16Mi"}, "requests": {"memory": "16Mi"}},
    )
    state = end_state(kube, kube_namespace, body)
    assert (state["reason"], state["exitCode"]) == ("OOMKilled", 137)
    # The helper reports every 4 MiB: it really allocated, and died before 256 MiB.
    output = logs(kube, kube_namespace, "hog")
    assert "4 MiB" in output and "allocated" not in output, output


def test_termination_message_and_logs_reach_the_api(
    kube: Kube, kube_namespace: str, real_node: RealNode
) -> None:
    command = ["/bin/helper", "echo", "hello from runc", ";",
               "write", "/dev/termination-log", "boom", ";", "exit", "3"]  # fmt: skip
    state = end_state(kube, kube_namespace, pod(real_node, "talker", command))
    assert (state["exitCode"], state["reason"], state["message"]) == (3, "Error", "boom\n")
    assert logs(kube, kube_namespace, "talker") == "hello from runc\n"


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every GET with a fixed body and records (client address, path)."""

    seen: ClassVar[list[tuple[str, str]]] = []
    BODY = b"dharma real node reached the host\n"

    def do_GET(self) -> None:
        self.seen.append((self.client_address[0], self.path))
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """An HTTP server on 127.0.0.1 only, like the tests' PostgreSQL and WebDAV."""
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _Recorder.seen
    server.shutdown()
    server.server_close()


def test_pod_reaches_a_loopback_service_of_the_host(
    kube: Kube,
    kube_namespace: str,
    real_node: RealNode,
    loopback_server: tuple[int, list[tuple[str, str]]],
) -> None:
    port, seen = loopback_server
    command = ["/bin/http", real_node.host_address, str(port), "/from-the-pod"]
    state = end_state(kube, kube_namespace, pod(real_node, "caller", command))
    output = logs(kube, kube_namespace, "caller")
    assert state["exitCode"] == 0, output
    assert "200 OK" in output and _Recorder.BODY.decode() in output, output
    # Seen from loopback, as services that trust only 127.0.0.1 (pg_hba) require.
    assert seen == [("127.0.0.1", "/from-the-pod")]


def test_pod_reaches_the_api_server_at_the_kubernetes_service(
    kube: Kube, kube_namespace: str, real_node: RealNode
) -> None:
    # The helper speaks plain HTTP: the API server's TLS port answers it with Go's
    # "Client sent an HTTP request to an HTTPS server" -- the port was reached.
    host, port = API_SERVICE
    command = ["/bin/http", host, str(port), "/readyz"]
    end_state(kube, kube_namespace, pod(real_node, "apicaller", command))
    output = logs(kube, kube_namespace, "apicaller")
    assert "Client sent an HTTP request to an HTTPS server" in output, output

    # The whole way with TLS and a ServiceAccount token, from the pods' network namespace.
    root_ca = core_api(kube).read_namespaced_config_map("kube-root-ca.crt", kube_namespace)
    ca: str = root_ca.data["ca.crt"]
    token = kube.kubectl("create", "token", "default", "-n", kube_namespace).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.crt"
        ca_file.write_text(ca)
        result = real_node.node_exec(
            "curl", "--silent", "--show-error", "--max-time", "10", "--cacert", str(ca_file),
            "--header", f"Authorization: Bearer {token}",
            f"https://kubernetes.default.svc:{port}/api/v1/namespaces/{kube_namespace}/pods",
            "--resolve", f"kubernetes.default.svc:{port}:{host}", check=False,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # The default ServiceAccount may not list pods: authenticated, then denied by RBAC.
    assert f"system:serviceaccount:{kube_namespace}:default" in result.stdout, result.stdout
