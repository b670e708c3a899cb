"""The test control plane as the controller benchmarks see it (`bench.controller`,
`bench.load`): the testbed as a session of this process, a namespace where the controller runs
as a ServiceAccount with the Helm chart's Role, list+watches that record when each Job and pod
stage is first seen, and the API server's and kube-controller-manager's own metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from controller import wire
from controller.jobspec import MANAGED_SELECTOR
from dharma_common.contract import LABEL_ATTEMPT, LABEL_JOB_ID
from dharma_common.errors import first_line

REPO = Path(__file__).resolve().parents[1]
#: The API server's priority-and-fairness flow schema for non-system ServiceAccounts: on the
#: testbed only this benchmark's controller uses one, so its counter is the controller's.
SA_FLOW_SCHEMA = "service-accounts"
#: The controller's Role in the Helm chart (deploy/helm/.../rbac.yaml), leader election off.
CONTROLLER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create"]},
]  # fmt: skip
Obj = dict[str, Any]


def prometheus_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)")
    for line in text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels") or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group("value"))
    return total


@dataclass
class SeenJob:
    name: str
    key: tuple[int, int] | None
    seen: float


def _stages(obj: Obj) -> tuple[str | None, list[str]]:
    """The runner Job an object belongs to and the stages it shows (for the breakdown of
    where an attempt's time goes: Job -> pod -> scheduled -> running -> succeeded -> Job
    complete -> row completed)."""
    meta = obj.get("metadata") or {}
    if obj.get("kind") == "Job" or "template" in (obj.get("spec") or {}):
        done = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in (obj.get("status") or {}).get("conditions") or [])  # fmt: skip
        return meta.get("name"), ["job", *(["job complete"] if done else [])]
    labels = meta.get("labels") or {}
    job = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    stages = ["pod created"]
    if (obj.get("spec") or {}).get("nodeName"):
        stages.append("pod scheduled")
    phase = (obj.get("status") or {}).get("phase")
    if phase in ("Running", "Succeeded", "Failed"):
        stages.append("pod running")
    if phase in ("Succeeded", "Failed"):
        stages.append("pod finished")
    return job, stages


class ObjectWatch:
    """List+watch of the namespace's Jobs (or pods) in this process: the local time each Job
    (by uid) was first seen, and when each stage of each attempt was first seen. A uid seen
    only by a relist (after a dropped watch) is flagged, since its time is then late."""

    def __init__(self, list_fn: Any, namespace: str) -> None:
        self._list_fn = list_fn
        self._namespace = namespace
        #: (Job name, stage) -> first seen
        self.marks: dict[tuple[str, str], float] = {}
        self.jobs: dict[str, SeenJob] = {}
        self.late: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._synced.wait(60):
            raise RuntimeError("the benchmark's Job watch did not sync within 60 s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def snapshot(self) -> dict[str, SeenJob]:
        with self._lock:
            return dict(self.jobs)

    def marks_snapshot(self) -> dict[tuple[str, str], float]:
        with self._lock:
            return dict(self.marks)

    def _record(self, obj: Obj, now: float, late: bool = False) -> None:
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid:
            return
        labels = meta.get("labels") or {}
        try:
            key: tuple[int, int] | None = (int(labels[LABEL_JOB_ID]), int(labels[LABEL_ATTEMPT]))
        except (KeyError, ValueError):
            key = None
        job, stages = _stages(obj)
        with self._lock:
            if job is not None:
                for stage in stages:
                    self.marks.setdefault((job, stage), now)
            if uid not in self.jobs and key is not None and "job" in stages:
                self.jobs[uid] = SeenJob(str(meta.get("name")), key, now)
                if late:
                    self.late.add(uid)

    def _list(self, late: bool) -> str:
        response = self._list_fn(
            self._namespace, label_selector=MANAGED_SELECTOR, _preload_content=False
        )
        body = json.loads(response.data)
        now = time.time()
        for obj in body.get("items") or []:
            self._record(obj, now, late)
        return str(body["metadata"]["resourceVersion"])

    def _run(self) -> None:
        version = self._list(late=False)
        self._synced.set()
        failures = 0
        while not self._stop.is_set():
            try:
                response = self._list_fn(
                    self._namespace, label_selector=MANAGED_SELECTOR, watch=True,
                    resource_version=version, allow_watch_bookmarks=True, timeout_seconds=30,
                    _preload_content=False, _request_timeout=(10, 60),
                )  # fmt: skip
                for line in wire.lines(response):
                    if not line:
                        continue
                    now = time.time()
                    event = wire.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._record(obj, now)
                    if self._stop.is_set():
                        break
            except Exception as exc:  # 410 Gone or a dropped connection: relist, flag late
                if self._stop.is_set():
                    return
                if not failures:  # one line per outage (other sessions restart the API server)
                    first = first_line(exc, 160)
                    print(f"  bench watch: {type(exc).__name__}: {first}; relisting",
                          file=sys.stderr)  # fmt: skip
                failures += 1
                self._stop.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
                with contextlib.suppress(Exception):  # still down: retried after the watch
                    version = self._list(late=True)
                    failures = 0


@dataclass
class Namespace:
    """The benchmark's namespace: restricted Pod Security, the runner's ConfigMap and Secret
    (referenced by every Job, never read here), and the controller's ServiceAccount + Role."""

    name: str
    core: Any
    rbac: Any
    kubeconfig: Path = field(default=Path())

    def create(self, admin_kubeconfig: Path, workdir: Path) -> None:
        restricted = {f"pod-security.kubernetes.io/{mode}": "restricted"
                      for mode in ("enforce", "warn", "audit")}  # fmt: skip
        self.core.create_namespace(
            {"metadata": {"name": self.name,
                          "labels": {**restricted, "dharma-stream.bench/controller": "true"}}}
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:  # ServiceAccount admission rejects pods until `default` exists
            try:
                self.core.read_namespaced_service_account("default", self.name)
                break
            except ApiException as exc:
                if exc.status != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.core.create_namespaced_config_map(
            self.name,
            {"metadata": {"name": "dharma-stream-runner"},
             "data": {"DB_HOST": "db.invalid", "WEBDAV_BASE_URL": "http://webdav.invalid/"}},
        )  # fmt: skip
        self.core.create_namespaced_secret(
            self.name,
            {"metadata": {"name": "dharma-stream"},
             "stringData": {"DB_PASSWORD": "unused", "WEBDAV_PASSWORD": "unused"}},
        )  # fmt: skip
        account = "dharma-stream-controller"
        self.core.create_namespaced_service_account(self.name, {"metadata": {"name": account}})
        self.rbac.create_namespaced_role(
            self.name, {"metadata": {"name": account}, "rules": CONTROLLER_RULES}
        )
        self.rbac.create_namespaced_role_binding(
            self.name,
            {"metadata": {"name": account},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": account},
             "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": self.name}]},
        )  # fmt: skip
        token = self.core.create_namespaced_service_account_token(
            account, self.name, {"spec": {"expirationSeconds": 3 * 3600}},
            _preload_content=False,
        )  # fmt: skip
        self.kubeconfig = workdir / "controller.kubeconfig"
        self.kubeconfig.write_text(
            _service_account_kubeconfig(admin_kubeconfig, json.loads(token.data)["status"])
        )
        self.kubeconfig.chmod(0o600)

    def delete(self, wait: float) -> bool:
        """Delete the namespace (and so every Job and pod); True once it is gone."""
        with contextlib.suppress(ApiException):
            self.core.delete_namespace(self.name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.core.read_namespace(self.name)
            except ApiException as exc:
                if exc.status == 404:
                    return True
            time.sleep(1)
        return False


def _service_account_kubeconfig(admin_kubeconfig: Path, status: dict[str, Any]) -> str:
    """The admin kubeconfig's cluster, with the ServiceAccount's bound token as the user."""
    import yaml

    admin: dict[str, Any] = yaml.safe_load(admin_kubeconfig.read_text())
    contexts = {c["name"]: c["context"] for c in admin["contexts"]}
    clusters = {c["name"]: c["cluster"] for c in admin["clusters"]}
    cluster = clusters[contexts[admin["current-context"]]["cluster"]]
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bench", "cluster": cluster}],
        "users": [{"name": "controller", "user": {"token": status["token"]}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "controller"}}],
        "current-context": "bench",
    }
    dumped: str = yaml.safe_dump(document)
    return dumped


def apiserver_metrics(kubeconfig: Path) -> str:
    """The API server's /metrics (kubectl handles the client certificate)."""
    done = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        check=True, text=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return done.stdout


def kcm_throttle(kubeconfig: Path) -> tuple[float, float]:
    """Seconds kube-controller-manager's clients waited in their own rate limiter, and their
    request count (NaN when unreadable). Why: the Job controller (client QPS 20 by default)
    creates each Job's pod and updates its status, and it bounds how fast attempts turn over
    once the cap binds; this shows whether it throttled during the run."""
    import ssl

    import yaml

    try:
        kc: dict[str, Any] = yaml.safe_load(kubeconfig.read_text())
        user = kc["users"][0]["user"]
        server = kc["clusters"][0]["cluster"]["server"]
        port = int(server.rpartition(":")[2]) - 443 + 257  # scripts/testbed's port layout
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # loopback, the component's self-signed cert
        context.load_cert_chain(user["client-certificate"], user["client-key"])
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            text = response.read().decode(errors="replace")
    except (OSError, KeyError, ValueError, TypeError):
        return math.nan, math.nan
    return (
        prometheus_value(text, "rest_client_rate_limiter_duration_seconds_sum"),
        prometheus_value(text, "rest_client_rate_limiter_duration_seconds_count"),
    )


def list_all_jobs(batch: Any, namespace: str) -> list[Obj]:
    items: list[Obj] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"label_selector": MANAGED_SELECTOR, "limit": 500}
        if token:
            kwargs["_continue"] = token
        body = json.loads(batch.list_namespaced_job(namespace, _preload_content=False,
                                                    **kwargs).data)  # fmt: skip
        items += body.get("items") or []
        token = (body.get("metadata") or {}).get("continue")
        if not token:
            return items
