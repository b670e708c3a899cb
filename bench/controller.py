"""Benchmark of the controller on the test control plane: rows -> Jobs latency, Jobs per second,
duplicates, RSS and API requests per Job.

Why these figures: the controller replaces a loop that polled every 30 s, so the latency from
INSERT to Job created is the user-visible win; Jobs per second bounds how fast a backlog
drains; duplicates must be zero (one Job per attempt is the contract); RSS must stay small
while the informer caches hold thousands of Jobs and pods.

What runs (nothing simulated except the pods' containers and what they would write):

* the testbed (`scripts/testbed up`: kube-apiserver, controller-manager's Job controller,
  scheduler, etcd, KWOK playing every pod as "succeed after --pod-delay"), registered as a
  session so no other session stops it under us, released at the end;
* the runner's final fenced commit (`result_attempt`) for each of those pods once it runs,
  which the controller requires before it records success and a simulated container cannot
  make (`tests.simulated_runner.SimulatedCommits`): the runner's write, on a connection and
  an API client of its own, so neither the controller's DB connections nor its API requests
  count it;
* a real PostgreSQL (tests/services.py) with a migrated database of its own;
* ONE `dharma-controller run --executor kubernetes` process (`python -m controller`), running
  as a ServiceAccount with the Helm chart's Role, so its API requests are counted separately
  by the API server's priority-and-fairness metrics (flow schema `service-accounts`);
* this process: inserts rows, watches the namespace's Jobs and records the local wall-clock
  time each Job is first seen (`metadata.creationTimestamp` and managedFields times have 1 s
  resolution), samples the controller's VmRSS, and waits until every row is completed.

The set-up and tear-down of all this is `harness()`, shared with `bench.load` (a backlog of
thousands of rows, or an hour-long soak).

Phases: a trickle (`--trickle-rows` single-row INSERT transactions at `--trickle-rate` per
second, far below the cap: the "under the cap" latency), then, once those Jobs exist, a
burst (the remaining rows in `--batch`-row INSERT transactions, back to back: the cap binds,
giving Jobs per second sustained). A row's insert time is taken just before its INSERT is
sent, so each latency includes the INSERT and its commit.

Usage: python -m bench.controller [--rows 2000] [--cap 200] [--keep-testbed]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg2
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from controller.jobspec import MANAGED_SELECTOR
from dharma_common.contract import LABEL_ATTEMPT, LABEL_JOB_ID
from tests.services import Database, DatabaseFactory, PostgresServer, free_port
from tests.simulated_runner import SimulatedCommits

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "scripts" / "testbed"
#: The API server's priority-and-fairness flow schema for non-system ServiceAccounts: on the
#: testbed only this benchmark's controller uses one, so its counter is the controller's.
SA_FLOW_SCHEMA = "service-accounts"
#: The controller's Role in the Helm chart (deploy/helm/.../rbac.yaml), leader election off.
CONTROLLER_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
]  # fmt: skip
Obj = dict[str, Any]
#: What the simulated runners wrote, for the reports' notes.
RUNNER_COMMITS_NOTE = (
    "runners' final commits (result_attempt): {} — simulated for KWOK's pods "
    "(tests/simulated_runner.py) on a DB connection and API client of their own: the "
    "runner's writes, in none of the controller's figures."
)


# ------------------------------------------------------------------------ small helpers ---


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 200 values is the 198th)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def testbed(*args: str, keep: bool = False) -> str:
    """`scripts/testbed` as a session of this process: `up` registers it, so another session's
    `release` cannot stop the control plane under the benchmark, and ours stops it only when
    this benchmark started it and nobody else uses it."""
    env = {**os.environ, "DHARMA_TESTBED_SESSION": str(os.getpid())}
    if keep:
        env["DHARMA_TESTBED_KEEP"] = "1"
    done = subprocess.run(
        [str(TESTBED), *args], check=True, text=True, stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    return done.stdout


def read_rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the kernel's own peak) of a process, in KiB."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


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


# ------------------------------------------------------------------------ observers ---


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
                for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                    if not line:
                        continue
                    now = time.time()
                    event = json.loads(line)
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
                    first = str(exc).splitlines()[0][:160] if str(exc) else ""
                    print(f"  bench watch: {type(exc).__name__}: {first}; relisting",
                          file=sys.stderr)  # fmt: skip
                failures += 1
                self._stop.wait(min(5.0, 0.2 * 2 ** min(failures, 5)))
                with contextlib.suppress(Exception):  # still down: retried after the watch
                    version = self._list(late=True)
                    failures = 0


class Periodic:
    """A daemon thread calling `tick()` every `interval` seconds until stopped."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=70)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()


class RssSampler(Periodic):
    """Samples the controller's VmRSS every `interval` seconds (and keeps the series)."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(interval, "bench-rss")
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.hwm_kib = 0

    def tick(self) -> None:
        values = read_rss_kib(self.pid)
        if "VmRSS" in values:
            self.samples.append((time.time(), values["VmRSS"]))
            self.hwm_kib = max(self.hwm_kib, values.get("VmHWM", 0))

    def max_mib(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024


# ------------------------------------------------------------------------ set-up ---


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


class ApiRequestCounter(Periodic):
    """The controller's API requests, from the API server's counter sampled every few
    seconds: a counter that went down means the API server restarted (other sessions share
    the testbed and their tests restart it), so the new value is added, not the delta."""

    def __init__(self, kubeconfig: Path, interval: float = 5.0) -> None:
        super().__init__(interval, "bench-api")
        self._kubeconfig = kubeconfig
        self._last: float | None = None
        self.total = 0.0
        self.resets = 0
        self._lock = threading.Lock()

    def tick(self) -> None:
        try:
            value = prometheus_value(
                apiserver_metrics(self._kubeconfig),
                "apiserver_flowcontrol_dispatched_requests_total", flow_schema=SA_FLOW_SCHEMA,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError):
            return  # the API server is restarting; the next sample catches up
        with self._lock:
            if self._last is not None:
                if value < self._last:
                    self.resets += 1
                    self.total += value
                else:
                    self.total += value - self._last
            self._last = value

    def start(self) -> None:
        self.tick()
        super().start()

    def finish(self) -> float:
        self.stop()
        self.tick()
        return self.total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (on a shared 2-CPU machine, what it costs)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def apiserver_metrics(kubeconfig: Path) -> str:
    """The API server's /metrics (kubectl handles the client certificate)."""
    done = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        check=True, text=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return done.stdout


# ------------------------------------------------------------------------ the run ---


@dataclass
class Results:
    rows: int
    cap: int
    trickle_ids: list[int]
    burst_ids: list[int]
    inserted: dict[int, float]
    burst_start: float
    jobs: dict[str, SeenJob]
    late: set[str]
    listed_jobs: int
    statuses: dict[str, int]
    attempts_over_one: int
    completed_at: float | None
    rss_max_mib: float
    rss_hwm_mib: float
    rss_idle_mib: float
    api_requests: float | None
    #: API server restarts seen while counting (by other sessions sharing the testbed)
    api_resets: int
    controller_metrics: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    controller_exit: int | None
    cpu_seconds: float
    #: kube-controller-manager's client-side rate limiter: (seconds waited, requests)
    kcm_throttle: tuple[float, ...]
    #: The simulated runners' commits (their own writes, not the controller's)
    runner_commits: int
    log_path: Path
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    #: (Job name, stage) -> first seen (local clock; "row completed": the row's finished_at)
    marks: dict[tuple[str, str], float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def insert_rows(conn: Any, count: int) -> tuple[list[int], float]:
    """One INSERT transaction of `count` jobs (each with its media row, as an upload makes
    them). Returns the job ids and the time just before the statement was sent."""
    started = time.time()
    with conn.cursor() as cur:
        cur.execute(
            "WITH m AS (INSERT INTO dharma.media_files (title, category_id, source_path)"
            " SELECT 'bench talk ' || g, 'talks', '/uploads/bench-' || g || '.mp4'"
            " FROM generate_series(1, %s) AS g RETURNING id)"
            " INSERT INTO dharma.stt_jobs (media_id) SELECT id FROM m RETURNING id",
            (count,),
        )
        ids = [row[0] for row in cur.fetchall()]
    conn.commit()
    return ids, started


def status_counts(conn: Any) -> dict[str, int]:
    with conn.cursor() as cur:
        cur.execute("SELECT status, count(*) FROM dharma.stt_jobs GROUP BY status")
        counts = {status: int(n) for status, n in cur.fetchall()}
    conn.commit()
    return counts


def _unfinished(counts: dict[str, int]) -> int:
    return counts.get("pending", 0) + counts.get("processing", 0)


def wait_for(probe: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL
            return int(response.status), response.read().decode()
    except OSError as exc:
        code = getattr(exc, "code", 0)
        return int(code or 0), str(exc)


@dataclass
class Stopped:
    """What the run left behind, read once the controller has stopped."""

    load_after: tuple[float, float, float]
    metrics_status: int
    controller_metrics: str
    api_requests: float
    api_resets: int
    rss_hwm_kib: int
    cpu_seconds: float
    kcm_throttle: tuple[float, ...]
    exit_code: int | None
    listed_jobs: int
    attempts_over_one: int
    #: (job id, runner name, finished_at as epoch seconds) of every finished row
    finished: list[tuple[int, str | None, float]]
    jobs: dict[str, SeenJob]
    late: set[str]
    #: (Job name, stage) -> first seen (local clock; "row completed": the row's finished_at)
    marks: dict[tuple[str, str], float]
    #: The simulated runners' commits that set result_attempt, and those fenced out
    runner_commits: int = 0
    runner_fenced: int = 0


@dataclass
class Harness:
    """The testbed, database, namespace and ONE controller process of a benchmark run, with
    this process's Job and pod watches, RSS sampler and API request counter running."""

    kubeconfig: Path
    batch: Any
    ns: Namespace
    db: Database
    proc: subprocess.Popen[bytes]
    watch: ObjectWatch
    pod_watch: ObjectWatch
    sampler: RssSampler
    api_counter: ApiRequestCounter
    runners: SimulatedCommits
    metrics_port: int
    log_path: Path
    rss_idle_mib: float
    kcm_before: tuple[float, float]
    load_before: tuple[float, float, float]

    def connect(self) -> Any:
        """A connection to the run's database, one transaction per statement batch."""
        conn = self.db.connect()
        conn.autocommit = False
        return conn

    def jobs_for(self, ids: list[int]) -> bool:
        keys = {j.key for j in self.watch.snapshot().values()}
        return all((i, 1) in keys for i in ids)

    def progress(self, counts: dict[str, int]) -> None:
        print(f"  {time.strftime('%H:%M:%S')} rows {counts}, Jobs seen {len(self.watch.jobs)}",
              file=sys.stderr)  # fmt: skip

    def wait_drained(
        self, conn: Any, timeout: float, every: float = 5.0
    ) -> tuple[float | None, dict[str, int]]:
        """Wait until no row is pending or processing: (time it happened or None, counts)."""
        deadline = time.monotonic() + timeout
        next_report = 0.0
        counts: dict[str, int] = {}
        while time.monotonic() < deadline:
            counts = status_counts(conn)
            if not _unfinished(counts):
                return time.time(), counts
            if self.proc.poll() is not None:
                break
            if time.monotonic() >= next_report:
                self.progress(counts)
                next_report = time.monotonic() + every
            time.sleep(0.25)
        return None, counts

    def stop(self, conn: Any) -> Stopped:
        """Read the controller's figures, stop it (SIGTERM), then read the database and the
        Jobs it left; the watches stop last."""
        load_after = os.getloadavg()
        status, controller_metrics = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        api_requests = self.api_counter.finish()
        hwm = max(read_rss_kib(self.proc.pid).get("VmHWM", 0), self.sampler.hwm_kib)
        cpu = cpu_seconds(self.proc.pid)
        kcm_after = kcm_throttle(self.kubeconfig)
        self.sampler.stop()
        self.proc.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            exit_code = self.proc.wait(timeout=30)
        time.sleep(1)  # let the watch deliver the last events before comparing with a list
        listed = _list_all_jobs(self.batch, self.ns.name)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM dharma.stt_jobs WHERE attempts > 1")
            over_one = int(cur.fetchone()[0])
            cur.execute(
                "SELECT id, runner_name, EXTRACT(EPOCH FROM finished_at)::float8"
                " FROM dharma.stt_jobs WHERE finished_at IS NOT NULL"
            )
            finished = [(int(i), name, float(at)) for i, name, at in cur.fetchall()]
        conn.commit()
        self.runners.stop()
        self.watch.stop()
        self.pod_watch.stop()
        marks = {**self.watch.marks_snapshot(), **self.pod_watch.marks_snapshot()}
        for _, name, at in finished:
            if name is not None:
                marks[(str(name), "row completed")] = at
        return Stopped(
            load_after=load_after, metrics_status=status, controller_metrics=controller_metrics,
            api_requests=api_requests, api_resets=self.api_counter.resets, rss_hwm_kib=hwm,
            cpu_seconds=cpu,
            kcm_throttle=tuple(a - b for a, b in zip(kcm_after, self.kcm_before, strict=True)),
            exit_code=exit_code, listed_jobs=len(listed), attempts_over_one=over_one,
            finished=finished, jobs=self.watch.snapshot(), late=self.watch.late, marks=marks,
            runner_commits=self.runners.committed, runner_fenced=self.runners.fenced,
        )  # fmt: skip


def add_harness_arguments(parser: argparse.ArgumentParser, timeout: float = 900) -> None:
    """The options every controller benchmark shares (see `harness`)."""
    parser.add_argument("--cap", type=int, default=200, help="MAX_CONCURRENT_JOBS")
    parser.add_argument(
        "--pod-delay",
        default="500ms",
        help="KWOK: how long each simulated pod runs before it succeeds",
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout, help="seconds to wait for the rows"
    )
    parser.add_argument(
        "--cleanup-wait", type=float, default=60, help="seconds to wait for the namespace deletion"
    )
    parser.add_argument(
        "--controller-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra controller setting (e.g. CLAIM_BATCH_SIZE=100); repeatable",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument(
        "--keep-testbed",
        action="store_true",
        help="leave the testbed running even if this benchmark started it",
    )


def controller_env(
    args: argparse.Namespace, db: Database, ns: Namespace, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "WEBDAV_"))}
    env.update(db.env())
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "EXECUTOR": "kubernetes",
            "KUBECONFIG": str(ns.kubeconfig),
            "NAMESPACE": ns.name,
            "POD_NAME": f"bench-controller-{secrets.token_hex(3)}",
            "METRICS_PORT": str(port),
            "MAX_CONCURRENT_JOBS": str(args.cap),
            "RUNNER_IMAGE": "registry.invalid/dharma/jobrunner:bench",
            # Small requests so `cap` pods fit on KWOK's 3 nodes (8 CPU, 110 pods, 100Gi of
            # ephemeral storage each; the scratch size is the runner's ephemeral request).
            "RUNNER_CPU_REQUEST": "10m",
            "RUNNER_MEMORY_REQUEST": "16Mi",
            "RUNNER_SCRATCH_SIZE": "128Mi",
            "RUNNER_MEMORY_LIMIT": "256Mi",
            "RUNNER_MEMORY_LIMIT_MAX": "512Mi",
            "RUNNER_POD_ANNOTATIONS": json.dumps(
                {"testbed.dharma/fate": "succeed", "testbed.dharma/delay": args.pod_delay}
            ),
            "LOG_LEVEL": "INFO",
        }
    )
    for item in args.controller_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def simulated_runners(
    kubeconfig: Path, namespace: str, db: Database
) -> tuple[SimulatedCommits, Any]:
    """The runners' final commits for the namespace's pods (see the module's docstring),
    started, with the API client of their own that the caller closes after stopping them.
    Their connection is named `bench-simulated-runner`, so the controller's connections
    (`dharma-controller...`) are counted without it."""

    def connect() -> Any:
        return psycopg2.connect(**db.settings.connect_kwargs("bench-simulated-runner"))

    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    try:
        return SimulatedCommits(api, namespace, connect).start(), api
    except Exception:
        api.close()
        raise


@contextlib.contextmanager
def harness(
    args: argparse.Namespace, workdir: Path, rss_interval: float = 0.25
) -> Iterator[Harness]:
    """Start everything (testbed session, PostgreSQL, namespace, watches, the controller, up
    to its /readyz) and tear it all down on exit, whatever happened."""
    kubeconfig = Path(testbed("up").strip().rpartition("=")[2])
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    ns = Namespace(
        f"bench-controller-{uuid.uuid4().hex[:6]}", core, client.RbacAuthorizationV1Api(api)
    )
    # Its own temporary directory: PostgreSQL runs as `postgres`, which cannot enter workdir.
    server: PostgresServer | None = None
    db: Database | None = None
    factory: DatabaseFactory | None = None
    proc: subprocess.Popen[bytes] | None = None
    watches: list[ObjectWatch] = []
    sampler: RssSampler | None = None
    runners: SimulatedCommits | None = None
    runner_api: Any = None
    try:
        server = PostgresServer()
        server.start()
        factory = DatabaseFactory(server)
        db = factory.create()
        ns.create(kubeconfig, workdir)
        print(f"namespace {ns.name}, database {db.name}, testbed kubeconfig {kubeconfig}",
              file=sys.stderr)  # fmt: skip
        for list_fn in (batch.list_namespaced_job, core.list_namespaced_pod):
            watches.append(ObjectWatch(list_fn, ns.name))
            watches[-1].start()
        runners, runner_api = simulated_runners(kubeconfig, ns.name, db)
        metrics_port = free_port()
        env = controller_env(args, db, ns, metrics_port)
        kcm_before = kcm_throttle(kubeconfig)
        api_counter = ApiRequestCounter(kubeconfig)
        api_counter.start()
        log_path = workdir / "controller.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "controller", "run", "--executor", "kubernetes"],
                env=env, stdout=log, stderr=log, cwd=REPO,
            )  # fmt: skip
        sampler = RssSampler(proc.pid, rss_interval)
        sampler.start()
        readyz = f"http://127.0.0.1:{metrics_port}/readyz"
        started = proc
        wait_for(lambda: started.poll() is not None or http_get(readyz)[0] == 200,
                 "the controller to be ready", 120)  # fmt: skip
        if proc.poll() is not None:
            raise RuntimeError(f"the controller exited ({proc.returncode}); see {log_path}")
        time.sleep(1)
        yield Harness(
            kubeconfig=kubeconfig, batch=batch, ns=ns, db=db, proc=proc, watch=watches[0],
            pod_watch=watches[1], sampler=sampler, api_counter=api_counter, runners=runners,
            metrics_port=metrics_port, log_path=log_path,
            rss_idle_mib=read_rss_kib(proc.pid).get("VmRSS", 0) / 1024,
            kcm_before=kcm_before, load_before=os.getloadavg(),
        )  # fmt: skip
    finally:
        if sampler is not None:
            sampler.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for w in watches:
            w.stop()
        if runners is not None:
            runners.stop()
        if runner_api is not None:
            runner_api.close()
        print("cleaning up: namespace, database, testbed session", file=sys.stderr)
        if not ns.delete(wait=args.cleanup_wait):
            print(f"  namespace {ns.name} still terminating; it will go on its own",
                  file=sys.stderr)  # fmt: skip
        if factory is not None and db is not None:
            with contextlib.suppress(Exception):
                factory.drop(db)
        if server is not None:
            server.close()
        api.close()
        testbed("release", str(os.getpid()), keep=args.keep_testbed)


def run(args: argparse.Namespace, workdir: Path, publish: Callable[[Results], None]) -> Results:
    with harness(args, workdir) as h:
        conn = h.connect()
        inserted: dict[int, float] = {}
        trickle_n = min(args.trickle_rows, args.rows)
        print(f"trickle: {trickle_n} rows, one per INSERT, {args.trickle_rate}/s", file=sys.stderr)
        trickle_ids: list[int] = []
        start = time.monotonic()
        for i in range(trickle_n):
            delay = start + i / args.trickle_rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids, at = insert_rows(conn, 1)
            trickle_ids += ids
            inserted.update(dict.fromkeys(ids, at))

        wait_for(lambda: h.jobs_for(trickle_ids), "the trickle's Jobs", 120)
        # Start the burst with nothing in flight, so its first `cap` rows measure how fast
        # the controller creates Jobs when the cap is free.
        print("waiting for the trickle's rows to complete", file=sys.stderr)
        wait_for(lambda: not _unfinished(status_counts(conn)), "the trickle to drain",
                 args.timeout)  # fmt: skip
        burst_n = args.rows - trickle_n
        print(f"burst: {burst_n} rows, {args.batch} per INSERT, back to back", file=sys.stderr)
        burst_ids: list[int] = []
        burst_start = time.time()
        while len(burst_ids) < burst_n:
            ids, at = insert_rows(conn, min(args.batch, burst_n - len(burst_ids)))
            burst_ids += ids
            inserted.update(dict.fromkeys(ids, at))

        completed_at, counts = h.wait_drained(conn, args.timeout)
        s = h.stop(conn)
        conn.close()
        notes = []
        if s.metrics_status != 200:
            notes.append(f"controller /metrics unavailable ({s.metrics_status})")
        results = Results(
            rows=args.rows, cap=args.cap, trickle_ids=trickle_ids, burst_ids=burst_ids,
            inserted=inserted, burst_start=burst_start, jobs=s.jobs, late=s.late,
            listed_jobs=s.listed_jobs, statuses=counts, attempts_over_one=s.attempts_over_one,
            completed_at=completed_at, rss_max_mib=h.sampler.max_mib(),
            rss_hwm_mib=s.rss_hwm_kib / 1024, rss_idle_mib=h.rss_idle_mib,
            api_requests=s.api_requests, api_resets=s.api_resets,
            controller_metrics=s.controller_metrics,
            load_before=h.load_before, load_after=s.load_after, controller_exit=s.exit_code,
            cpu_seconds=s.cpu_seconds, kcm_throttle=s.kcm_throttle,
            runner_commits=s.runner_commits,
            log_path=h.log_path, rss_samples=h.sampler.samples, marks=s.marks, notes=notes,
        )  # fmt: skip
        publish(results)  # before the clean-up, which may take a while
        return results


def _list_all_jobs(batch: Any, namespace: str) -> list[Obj]:
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


# ------------------------------------------------------------------------ report ---


def first_seen_and_duplicates(
    jobs: dict[str, SeenJob],
) -> tuple[dict[tuple[int, int], float], int]:
    """When each (job id, attempt) first had a Job, and how many Jobs beyond one any
    (job id, attempt) had (the contract: exactly one Job per attempt, so this must be 0)."""
    first_seen: dict[tuple[int, int], float] = {}
    per_key: Counter[tuple[int, int]] = Counter()
    for job in jobs.values():
        if job.key is None:
            continue
        per_key[job.key] += 1
        first_seen[job.key] = min(job.seen, first_seen.get(job.key, math.inf))
    return first_seen, sum(n - 1 for n in per_key.values() if n > 1)


def format_table(lines: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def report(r: Results) -> tuple[str, bool]:
    """The table (figure beside its target) and whether every target was met."""
    first_seen, duplicates = first_seen_and_duplicates(r.jobs)
    latency = {i: first_seen[(i, 1)] - t for i, t in r.inserted.items() if (i, 1) in first_seen}
    missing = len(r.inserted) - len(latency)
    trickle = [latency[i] for i in r.trickle_ids if i in latency]
    first_cap_burst = [latency[i] for i in r.burst_ids[: r.cap] if i in latency]
    overall = list(latency.values())
    burst_seen = sorted(first_seen[(i, 1)] for i in r.burst_ids if (i, 1) in first_seen)
    free = burst_seen[: r.cap]
    free_rate = len(free) / (free[-1] - r.burst_start) if free else math.nan
    bound = burst_seen[r.cap :]
    bound_rate = len(bound) / (bound[-1] - free[-1]) if bound and bound[-1] > free[-1] else math.nan
    if burst_seen:
        span = burst_seen[-1] - r.burst_start
        sustained = len(burst_seen) / span if span > 0 else math.nan
        peak = _peak_rate(burst_seen, 10.0)
    else:
        sustained = peak = math.nan
    drain = (r.completed_at - r.burst_start) if r.completed_at else math.nan
    m = r.controller_metrics
    passes = prometheus_value(m, "dharma_reconcile_passes_total")
    claims = prometheus_value(m, "dharma_claims_total")
    launch_errors = prometheus_value(m, "dharma_runner_launches_total", result="error")
    relists = prometheus_value(m, "dharma_watch_relists_total")
    total_jobs = len(r.jobs)
    api_per_job = (r.api_requests / total_jobs) if r.api_requests and total_jobs else math.nan

    ok_p99 = percentile(trickle, 99) <= 1.0
    ok_rate = free_rate >= 50
    ok_rss = r.rss_hwm_mib <= 150
    ok_dup = duplicates == 0 and total_jobs == r.rows and missing == 0
    ok_done = r.completed_at is not None and r.statuses.get("completed", 0) == r.rows

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.0f} ms" if values else "n/a"

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        ("Metric", "Figure", "Target", ""),
        (f"INSERT->Job p50, under the cap (trickle, {len(trickle)} rows)", ms(trickle, 50), "", ""),
        (f"INSERT->Job p99, under the cap (trickle, {len(trickle)} rows)", ms(trickle, 99),
         "<= 1000 ms", mark(ok_p99)),
        (f"INSERT->Job p50, first {r.cap} rows of the burst", ms(first_cap_burst, 50), "", ""),
        (f"INSERT->Job p99, first {r.cap} rows of the burst", ms(first_cap_burst, 99), "", ""),
        (f"INSERT->Job p50, all {len(overall)} rows", ms(overall, 50), "", ""),
        (f"INSERT->Job p99, all {len(overall)} rows", ms(overall, 99), "", ""),
        (f"Jobs created/s, cap free (burst's first {len(free)} rows)", f"{free_rate:.1f}",
         ">= 50", mark(ok_rate)),
        (f"Jobs created/s, cap binding (burst's other {len(bound)} rows)", f"{bound_rate:.1f}",
         ">= 50", "bound by testbed" if bound_rate < 50 else "ok"),
        (f"Jobs created/s, whole burst of {len(burst_seen)} / best 10 s window",
         f"{sustained:.1f} / {peak:.1f}", "", ""),
        ("Burst drained (INSERT to last row completed)", f"{drain:.1f} s", "", ""),
        ("Duplicate Jobs (per job id+attempt > 1)", str(duplicates), "0", mark(ok_dup)),
        ("Jobs seen / listed at end / rows", f"{total_jobs} / {r.listed_jobs} / {r.rows}",
         "= rows", mark(ok_dup)),
        ("Rows completed (attempts > 1)",
         f"{r.statuses.get('completed', 0)} ({r.attempts_over_one})", f"{r.rows} (0)",
         mark(ok_done)),
        ("Controller RSS max (sampled VmRSS / VmHWM)",
         f"{r.rss_max_mib:.0f} / {r.rss_hwm_mib:.0f} MiB", "<= 150 MB", mark(ok_rss)),
        ("Controller RSS when idle after sync", f"{r.rss_idle_mib:.0f} MiB", "", ""),
        ("Controller CPU time (user+system)", f"{r.cpu_seconds:.1f} s", "", ""),
        ("kube-controller-manager rate-limiter wait / requests",
         f"{r.kcm_throttle[0]:.0f} s / {r.kcm_throttle[1]:.0f}", "", ""),
        ("API requests by the controller per Job", f"{api_per_job:.2f}", "", ""),
        ("Controller passes / claims / launch errors / relists",
         f"{passes:.0f} / {claims:.0f} / {launch_errors:.0f} / {relists:.0f}", "", ""),
        ("Load average 1/5/15 min before -> after",
         f"{format_load(r.load_before)} -> {format_load(r.load_after)} "
         f"({os.cpu_count()} CPUs)", "", ""),
    ]  # fmt: skip
    lines += _breakdown(r)
    out = format_table(lines)
    notes = list(r.notes)
    if missing:
        notes.append(f"{missing} rows have no Job seen by the watch")
    if r.late:
        notes.append(f"{len(r.late)} Jobs were first seen by a relist (their time is late)")
    if r.controller_exit not in (0, None):
        notes.append(f"controller exit status {r.controller_exit}")
    notes.append("Job time: local wall clock when this process's watch first saw the Job "
                 "(creationTimestamp has 1 s resolution); INSERT time: just before the INSERT "
                 "was sent.")  # fmt: skip
    notes.append(f"API requests: apiserver_flowcontrol_dispatched_requests_total"
                 f"{{flow_schema={SA_FLOW_SCHEMA!r}}} delta (the controller's ServiceAccount)"
                 f" = {r.api_requests:.0f}, watches and lists included; API server restarts "
                 f"during the run (other sessions' tests): {r.api_resets}.")  # fmt: skip
    notes.append(RUNNER_COMMITS_NOTE.format(r.runner_commits))
    notes.append(f"controller log: {r.log_path}")
    out += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(out), ok_p99 and ok_rate and ok_rss and ok_dup and ok_done


STAGES = ("job", "pod created", "pod scheduled", "pod running", "pod finished", "job complete",
          "row completed")  # fmt: skip


def _breakdown(r: Results) -> list[tuple[str, str, str, str]]:
    """Median and p99 of each step of an attempt's life, burst rows only (where time goes
    when the cap binds; this is what bounds Jobs per second: cap / attempt cycle)."""
    # Job names end in `-<job id>-<attempt>` (before it: the prefix and the instance hash).
    burst = {str(i) for i in r.burst_ids}
    names = sorted({n for n, _ in r.marks if n.endswith("-1") and n.split("-")[-2] in burst})
    rows = []
    for before, after in itertools.pairwise(STAGES):
        deltas = [r.marks[(n, after)] - r.marks[(n, before)] for n in names
                  if (n, before) in r.marks and (n, after) in r.marks]  # fmt: skip
        if deltas:
            rows.append((f"  burst: {before} -> {after} (p50 / p99)",
                         f"{percentile(deltas, 50):.2f} / {percentile(deltas, 99):.2f} s",
                         "", ""))  # fmt: skip
    return rows


def _peak_rate(times: list[float], window: float) -> float:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def format_load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.controller",
        description="rows -> Jobs benchmark of dharma-controller on the test control plane",
    )
    parser.add_argument("--rows", type=int, default=2000, help="rows enqueued in all")
    parser.add_argument(
        "--trickle-rows",
        type=int,
        default=200,
        help="rows inserted one per transaction, below the cap, first",
    )
    parser.add_argument("--trickle-rate", type=float, default=20.0, help="trickle rows per second")
    parser.add_argument("--batch", type=int, default=100, help="rows per INSERT in the burst")
    add_harness_arguments(parser)
    args = parser.parse_args(argv)  # fmt: skip
    if args.rows < 1 or args.cap < 1 or args.trickle_rate <= 0:
        parser.error("--rows, --cap and --trickle-rate must be positive")
    return run_and_publish("controller", args, run, report, _raw)


class _Logged(Protocol):
    log_path: Path


R = TypeVar("R", bound=_Logged)


def run_and_publish(
    name: str,
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace, Path, Callable[[R], None]], object],
    report: Callable[[R], tuple[str, bool]],
    raw: Callable[[R], dict[str, Any]],
) -> int:
    """Run a benchmark in a scratch directory and print its report as soon as it is ready
    (before the clean-up, which may take a while), keeping the controller's log under
    /tmp/dharma-bench-<name>.log and the raw figures in --json. Exit status 0 when the
    report says every target was met."""
    verdict: list[bool] = []

    def publish(result: R) -> None:
        table, ok = report(result)
        verdict.append(ok)
        keep_log = Path(tempfile.gettempdir()) / f"dharma-bench-{name}.log"
        with contextlib.suppress(OSError):
            keep_log.write_bytes(result.log_path.read_bytes())
            table = table.replace(str(result.log_path), str(keep_log))
        print(table, flush=True)
        if args.json:
            args.json.write_text(json.dumps(raw(result), indent=1))

    with tempfile.TemporaryDirectory(prefix=f"dharma-bench-{name}-") as tmp:
        run(args, Path(tmp), publish)
    return 0 if verdict and verdict[0] else 1


def _raw(r: Results) -> dict[str, Any]:
    seen: defaultdict[str, list[float]] = defaultdict(list)
    for job in r.jobs.values():
        seen[job.name].append(job.seen)
    return {
        "rows": r.rows, "cap": r.cap, "inserted": r.inserted, "burst_start": r.burst_start,
        "trickle_ids": r.trickle_ids, "job_seen": seen, "statuses": r.statuses,
        "rss_samples_kib": r.rss_samples,
        "marks": [[name, stage, at] for (name, stage), at in r.marks.items()],
        "api_requests": r.api_requests, "api_resets": r.api_resets,
        "load_before": r.load_before, "load_after": r.load_after,
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
