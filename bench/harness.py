"""One controller benchmark run, set up and torn down whatever happens (`harness()`): a
testbed session, a real PostgreSQL (`devtools.services`) with a migrated database of its own,
the namespace (`bench.cluster`), the runners' final commits simulated for KWOK's pods
(`devtools.simulated_runner`), ONE `dharma-controller run --executor kubernetes` process, and
this process's Job and pod watches, RSS sampler and API request counter. Also the options
every controller benchmark shares and `run_and_publish`. Used by `bench.controller` and
`bench.load`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import psycopg2
from kubernetes import client, config

from bench.cluster import (
    REPO,
    SA_FLOW_SCHEMA,
    Namespace,
    ObjectWatch,
    SeenJob,
    apiserver_metrics,
    kcm_throttle,
    list_all_jobs,
    prometheus_value,
)
from devtools.kwok import DELAY, FATE
from devtools.services import Database, DatabaseFactory, PostgresServer, free_port
from devtools.simulated_runner import SimulatedCommits
from devtools.testbed import Sessions


def read_rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the kernel's own peak) of a process, in KiB."""
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (on a shared 2-CPU machine, what it costs)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    """Samples a process's VmRSS every `interval` seconds (and keeps the series): the
    controller's in bench.controller and bench.load, the runner's in bench.longtalk."""

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


def unfinished(counts: dict[str, int]) -> int:
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
    #: CPU seconds the controller had spent once ready (imports, migrations, first lists):
    #: start-up, not work per Job
    cpu_ready: float
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
            if not unfinished(counts):
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
        listed = list_all_jobs(self.batch, self.ns.name)
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
            "RUNNER_POD_ANNOTATIONS": json.dumps({FATE: "succeed", DELAY: args.pod_delay}),
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


@dataclass
class _Started:
    """What `harness()` has started so far, so that its teardown (`_tear_down`) stops exactly
    that, however far the start-up got before it failed."""

    sessions: Sessions = field(default_factory=Sessions)
    server: PostgresServer | None = None
    factory: DatabaseFactory | None = None
    db: Database | None = None
    proc: subprocess.Popen[bytes] | None = None
    watches: list[ObjectWatch] = field(default_factory=list)
    sampler: RssSampler | None = None
    runners: SimulatedCommits | None = None
    runner_api: Any = None


def _start_database(started: _Started) -> Database:
    """A PostgreSQL of the run's own (in its own temporary directory: PostgreSQL runs as
    `postgres`, which cannot enter workdir) and a migrated database on it, recorded in
    `started` as they come up."""
    started.server = PostgresServer()
    started.server.start()
    started.factory = DatabaseFactory(started.server)
    started.db = started.factory.create()
    return started.db


def _start_controller(
    started: _Started, env: dict[str, str], workdir: Path, rss_interval: float
) -> tuple[subprocess.Popen[bytes], Path]:
    """ONE `dharma-controller run --executor kubernetes` process logging to
    workdir/controller.log, with its RSS sampler; both recorded in `started`."""
    log_path = workdir / "controller.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller", "run", "--executor", "kubernetes"],
            env=env, stdout=log, stderr=log, cwd=REPO,
        )  # fmt: skip
    started.proc = proc
    started.sampler = RssSampler(proc.pid, rss_interval)
    started.sampler.start()
    return proc, log_path


def _wait_until_ready(proc: subprocess.Popen[bytes], metrics_port: int, log_path: Path) -> None:
    """Wait for the controller's /readyz (or its exit, which is an error), then one second
    more before the benchmark starts."""
    readyz = f"http://127.0.0.1:{metrics_port}/readyz"
    wait_for(lambda: proc.poll() is not None or http_get(readyz)[0] == 200,
             "the controller to be ready", 120)  # fmt: skip
    if proc.poll() is not None:
        raise RuntimeError(f"the controller exited ({proc.returncode}); see {log_path}")
    time.sleep(1)


def _tear_down(started: _Started, ns: Namespace, api: Any, args: argparse.Namespace) -> None:
    """Stop what `harness()` started, in this order: the sampler, the controller (killed if
    still running), the watches, the simulated runners and their API client, then the
    namespace, the database, PostgreSQL, the API client and the testbed session."""
    if started.sampler is not None:
        started.sampler.stop()
    if started.proc is not None and started.proc.poll() is None:
        started.proc.kill()
        started.proc.wait(timeout=30)
    for w in started.watches:
        w.stop()
    if started.runners is not None:
        started.runners.stop()
    if started.runner_api is not None:
        started.runner_api.close()
    print("cleaning up: namespace, database, testbed session", file=sys.stderr)
    if not ns.delete(wait=args.cleanup_wait):
        print(f"  namespace {ns.name} still terminating; it will go on its own",
              file=sys.stderr)  # fmt: skip
    if started.factory is not None and started.db is not None:
        with contextlib.suppress(Exception):
            started.factory.drop(started.db)
    if started.server is not None:
        started.server.close()
    api.close()
    print(f"testbed: {started.sessions.release(keep=args.keep_testbed)}", file=sys.stderr)


@contextlib.contextmanager
def harness(
    args: argparse.Namespace, workdir: Path, rss_interval: float = 0.25
) -> Iterator[Harness]:
    """Start everything (testbed session, PostgreSQL, namespace, watches, the controller, up
    to its /readyz) and tear it all down on exit, whatever happened."""
    sessions = Sessions()
    kubeconfig = sessions.up()
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    core: Any = client.CoreV1Api(api)
    batch: Any = client.BatchV1Api(api)
    ns = Namespace(
        f"bench-controller-{uuid.uuid4().hex[:6]}", core, client.RbacAuthorizationV1Api(api)
    )
    started = _Started(sessions=sessions)
    try:
        db = _start_database(started)
        ns.create(kubeconfig, workdir)
        print(f"namespace {ns.name}, database {db.name}, testbed kubeconfig {kubeconfig}",
              file=sys.stderr)  # fmt: skip
        for list_fn in (batch.list_namespaced_job, core.list_namespaced_pod):
            started.watches.append(ObjectWatch(list_fn, ns.name))
            started.watches[-1].start()
        started.runners, started.runner_api = simulated_runners(kubeconfig, ns.name, db)
        metrics_port = free_port()
        env = controller_env(args, db, ns, metrics_port)
        kcm_before = kcm_throttle(kubeconfig)
        api_counter = ApiRequestCounter(kubeconfig)
        api_counter.start()
        proc, log_path = _start_controller(started, env, workdir, rss_interval)
        assert started.sampler is not None
        _wait_until_ready(proc, metrics_port, log_path)
        yield Harness(
            kubeconfig=kubeconfig, batch=batch, ns=ns, db=db, proc=proc,
            watch=started.watches[0], pod_watch=started.watches[1], sampler=started.sampler,
            api_counter=api_counter, runners=started.runners, metrics_port=metrics_port,
            log_path=log_path, rss_idle_mib=read_rss_kib(proc.pid).get("VmRSS", 0) / 1024,
            cpu_ready=cpu_seconds(proc.pid), kcm_before=kcm_before, load_before=os.getloadavg(),
        )  # fmt: skip
    finally:
        _tear_down(started, ns, api, args)


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
