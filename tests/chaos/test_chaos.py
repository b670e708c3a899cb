"""Fault injection: the controller keeps its guarantees while everything around it breaks.

Why: crash-safety (DESIGN.md, "Attempts and fencing") is claimed for every instant, but the
targeted tests only hit chosen instants. Here real jobs flow through the real controller,
real PostgreSQL and (first scenario) the real Kubernetes control plane with KWOK-simulated
pods, or (second scenario) the local executor running the real jobrunner against WsgiDAV,
while faults land at random moments (seeded; the seed is printed, `--chaos-seed` replays it):

- the controller is SIGKILLed and restarted;
- PostgreSQL restarts, by fast shutdown and by crash (a private server, so other tests'
  databases are never touched);
- kube-apiserver restarts (at most a few times: the testbed is shared);
- Jobs and pods are deleted behind the controller's back;
- WebDAV requests fail or stall (local scenario);
- rows are set `cancelled` by hand.

Once the faults stop, the system is given a bounded time to settle, then only invariants are
asserted (never timings):

1. every row is `completed`, `failed` with a reason and a message, or `cancelled`;
2. no attempt ran twice: at most one Kubernetes Job (uid) per (job id, attempt), tracked
   with the test's own watch; at most one runner process per attempt (local);
3. no attempt was launched without a claim: every runner's job id exists and its attempt is
   between 1 and the row's `attempts`;
4. no subtitles were duplicated: no media has the same segment twice, and every completed
   media has the segment count of one run.

A table of faults by kind, outcomes and violations is printed (and shown in the terminal
summary even when the test passes). Run longer with `--chaos-seconds 600`.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from kubernetes import client, config, watch

from controller.jobspec import MANAGED_SELECTOR
from devtools.controller_helpers import ControllerProcess
from devtools.kwok import DELAY, EXIT_CODE, FATE, MESSAGE
from devtools.media import MODELS, make_media
from devtools.services import Database, DatabaseFactory, PostgresServer, WebDAVServer
from devtools.simulated_runner import SimulatedCommits
from dharma_common.contract import LABEL_ATTEMPT, LABEL_JOB_ID
from tests.chaos.conftest import TABLES, ChaosRun
from tests.controller_fixtures import KubeSetup

pytestmark = [pytest.mark.chaos]  # timeout: set from --chaos-seconds in conftest.py
Start = Callable[..., ControllerProcess]
TERMINAL = ("completed", "failed", "cancelled")


# ------------------------------------------------------------------------ plumbing ---


@pytest.fixture
def private_pg() -> Iterator[tuple[PostgresServer, Database]]:
    """A PostgreSQL server of this test's own: it is restarted and crashed on purpose, which
    must never disturb the session-wide server other tests share."""
    server = PostgresServer()
    server.start()
    try:
        database = DatabaseFactory(server).create()
        yield server, database
    finally:
        server.close()


def restart_postgres(pg: PostgresServer, rng: random.Random, crash: bool) -> Callable[[], bool]:
    """A fault: fast shutdown (SIGINT: every session ends) or crash (SIGKILL of every server
    process: crash recovery on start; PostgresServer.stop clears the stale lock files), a
    pause, then start again."""

    def fault() -> bool:
        pg.stop(signal.SIGKILL if crash else signal.SIGINT)
        time.sleep(rng.uniform(0, 2))
        pg.start()
        return True

    return fault


class Controllers:
    """The controller processes of one scenario, oldest first; the last is the live one.
    `kill` SIGKILLs it and starts the next, as a Deployment (or systemd) would."""

    def __init__(self, start: Start, env: Callable[[], dict[str, str]], rng: random.Random,
                 first_env: dict[str, str] | None = None) -> None:  # fmt: skip
        self._start, self._env, self._rng = start, env, rng
        self.all = [start(first_env if first_env is not None else env())]

    def keep_alive(self) -> None:
        if not self.all[-1].alive():
            self.all.append(self._start(self._env()))

    def kill(self) -> bool:
        self.all[-1].kill()
        time.sleep(self._rng.uniform(0, 1.5))
        self.keep_alive()
        return True


class Sql:
    """Short-lived connections with bounded retries: the database goes away on purpose, and
    the test's own queries must ride through that like the controller does."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def run(self, query: str, *params: Any, attempts: int = 240) -> list[Any]:
        for attempt in range(attempts):
            try:
                with contextlib.closing(self.database.connect()) as conn, conn.cursor() as cur:
                    cur.execute(query, params)
                    return list(cur.fetchall()) if cur.description else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.25)
        raise AssertionError("unreachable")

    def add_jobs(self, count: int, source_path: str, max_attempts: int) -> list[int]:
        ids: list[int] = []
        for _ in range(count):
            (media_id,) = self.run(
                "INSERT INTO dharma.media_files (title, category_id, source_path)"
                " VALUES ('chaos', 'talks', %s) RETURNING id",
                source_path,
            )[0]
            (job_id,) = self.run(
                "INSERT INTO dharma.stt_jobs (media_id, max_attempts) VALUES (%s, %s) RETURNING id",
                media_id,
                max_attempts,
            )[0]
            ids.append(job_id)
        return ids

    def cancel_one(self, pick: Callable[[list[int]], int]) -> bool:
        live = [r[0] for r in self.run(
            "SELECT id FROM dharma.stt_jobs WHERE status IN ('pending', 'processing')"
        )]  # fmt: skip
        if not live:
            return False
        job_id = pick(live)
        return bool(self.run(
            "UPDATE dharma.stt_jobs SET status = 'cancelled'"
            " WHERE id = %s AND status IN ('pending', 'processing') RETURNING id",
            job_id,
        ))  # fmt: skip

    def rows(self) -> dict[int, tuple[str, int, str | None, str | None, Any]]:
        return {
            r[0]: (r[1], r[2], r[3], r[4], r[5])
            for r in self.run(
                "SELECT id, status, attempts, failure_reason, error_message, media_id"
                " FROM dharma.stt_jobs"
            )
        }


@dataclass
class Tally:
    """What happened, for the table and the assertions."""

    title: str
    seed: int
    faults: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    jobs: int = 0
    runners: int = 0
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"== chaos: {self.title} (seed {self.seed}) ==", "faults injected:"]
        lines += [f"  {k:<28}{v:>6}" for k, v in sorted(self.faults.items())]
        if self.skipped:
            lines.append("faults not applicable at their moment (nothing to hit):")
            lines += [f"  {k:<28}{v:>6}" for k, v in sorted(self.skipped.items())]
        lines.append(f"jobs: {self.jobs}   runners launched: {self.runners}")
        lines.append("outcomes (status / failure_reason):")
        lines += [f"  {k:<40}{v:>6}" for k, v in sorted(self.outcomes.items())]
        lines += self.notes
        lines.append(f"invariant violations: {len(self.violations)}")
        lines += [f"  ! {v}" for v in self.violations[:50]]
        return "\n".join(lines)

    def report(self) -> None:
        text = self.table()
        print(text)
        TABLES.append(text)
        assert not self.violations, text


def inject(
    chaos: ChaosRun,
    tally: Tally,
    faults: dict[str, tuple[float, Callable[[], bool]]],
    feed: Callable[[], None],
    pause: tuple[float, float],
) -> None:
    """For `chaos.seconds`: add some rows (`feed`), wait a random moment, inject one fault
    chosen by weight. A fault returns False when it found nothing to hit (counted apart)."""
    names = sorted(faults)
    started = time.monotonic()
    while time.monotonic() < started + chaos.seconds:
        feed()
        time.sleep(chaos.rng.uniform(*pause))
        kind = chaos.rng.choices(names, weights=[faults[n][0] for n in names])[0]
        began = time.monotonic()
        hit = faults[kind][1]()
        (tally.faults if hit else tally.skipped)[kind] += 1
        print(f"{began - started:6.1f} s  {kind}{'' if hit else ' (nothing to hit)'}"
              f" [{time.monotonic() - began:.1f} s]")  # fmt: skip


def settle(sql: Sql, timeout: float, keep_alive: Callable[[], None]) -> None:
    """Wait (bounded) until every row is terminal; the caller's invariants then say what is
    wrong if some never gets there. `keep_alive` restarts the controller if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keep_alive()
        (left,) = sql.run("SELECT count(*) FROM dharma.stt_jobs WHERE status NOT IN %s", TERMINAL)[
            0
        ]
        if left == 0:
            return
        time.sleep(0.5)


def check_rows(tally: Tally, rows: dict[int, tuple[str, int, str | None, str | None, Any]]) -> None:
    """Invariant 1: every row ended, and a failure says why."""
    tally.jobs = len(rows)
    for job_id, (status, attempts, reason, message, _) in sorted(rows.items()):
        tally.outcomes[status + (f" / {reason}" if status == "failed" else "")] += 1
        if status not in TERMINAL:
            tally.violations.append(f"job {job_id} is still {status} (attempt {attempts})")
        elif status == "failed" and not (reason and message):
            tally.violations.append(f"job {job_id} failed without a reason: {reason!r} {message!r}")


def check_runners(
    tally: Tally,
    rows: dict[int, tuple[str, int, str | None, str | None, Any]],
    runners: dict[tuple[int, int], set[str]],
) -> None:
    """Invariants 2 and 3 over every runner ever seen, keyed by (job id, attempt)."""
    tally.runners = sum(len(v) for v in runners.values())
    for (job_id, attempt), ids in sorted(runners.items()):
        if len(ids) > 1:
            tally.violations.append(
                f"attempt ran twice: job {job_id} attempt {attempt} had {len(ids)} runners"
            )
        row = rows.get(job_id)
        if row is None or not 1 <= attempt <= row[1]:
            claimed = row[1] if row else "no row"
            tally.violations.append(
                f"launched without a claim: job {job_id} attempt {attempt} (row: {claimed})"
            )


# -------------------------------------------------------------- Kubernetes scenario ---


class JobTracker:
    """Every Job the controller ever created in the namespace, by uid, from the test's own
    list+watch (relisting after every break, e.g. an API server restart). Jobs are never
    deleted by TTL here, and the faults that delete Jobs list them first, so the record is
    complete up to a Job created and deleted within one relist gap — which could only hide
    a violation, never invent one."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        api_client = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.batch: Any = client.BatchV1Api(api_client)
        self.namespace = namespace
        self.seen: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-tracker", daemon=True)
        self._thread.start()

    def record(self, job: Any) -> None:
        meta = job.metadata
        labels = meta.labels or {}
        if LABEL_JOB_ID in labels and LABEL_ATTEMPT in labels:
            with self._lock:
                self.seen[meta.uid] = (int(labels[LABEL_JOB_ID]), int(labels[LABEL_ATTEMPT]))

    def relist(self) -> str:
        listing = self.batch.list_namespaced_job(
            self.namespace, label_selector=MANAGED_SELECTOR, _request_timeout=10
        )
        for job in listing.items:
            self.record(job)
        version: str = listing.metadata.resource_version
        return version

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self.relist()
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.batch.list_namespaced_job, self.namespace,
                    label_selector=MANAGED_SELECTOR, resource_version=version,
                    timeout_seconds=5, _request_timeout=10,
                )  # fmt: skip
                for event in stream:
                    if event["type"] == "ERROR":
                        break
                    self.record(event["object"])
                    if self._stop.is_set():
                        return
            except Exception:  # the API server restarts on purpose; relist
                time.sleep(0.2)

    def by_attempt(self) -> dict[tuple[int, int], set[str]]:
        for _ in range(60):  # a final relist, riding through a restarting API server
            try:
                self.relist()
                break
            except Exception:  # still restarting: try again
                time.sleep(1)
        self._stop.set()
        self._thread.join(timeout=30)
        result: dict[tuple[int, int], set[str]] = {}
        with self._lock:
            for uid, token in self.seen.items():
                result.setdefault(token, set()).add(uid)
        return result


def in_flight(kind: str, obj: dict[str, Any]) -> bool:
    """A Job not yet Complete/Failed, or a pod still Pending/Running."""
    status = obj.get("status") or {}
    if kind == "pod":
        return status.get("phase", "Pending") in ("Pending", "Running")
    done = {"Complete", "Failed"}
    conditions = status.get("conditions") or []
    return not any(c.get("type") in done and c.get("status") == "True" for c in conditions)


def pod_fate(rng: random.Random, first: bool = False) -> str:
    """The fate of every pod one controller incarnation creates (annotations are set per
    controller): mostly success after a short run, sometimes a temporary or a permanent
    runner failure with a message, so retries and final failures flow too. The first
    incarnation claims most rows at once, so it always succeeds: otherwise one unlucky roll
    (seed 908339426) fails every row permanently and little else is exercised."""
    delay = f"{rng.choice((300, 800, 1500, 3000))}ms"
    roll = 0.0 if first else rng.random()
    if roll < 0.7:
        fate = {FATE: "succeed", DELAY: delay}
    elif roll < 0.85:
        fate = {FATE: "fail", DELAY: delay, EXIT_CODE: "11", MESSAGE: "chaos: WebDAV flaked"}
    else:
        fate = {FATE: "fail", DELAY: delay, EXIT_CODE: "10", MESSAGE: "chaos: bad media"}
    return json.dumps(fate)


@pytest.fixture
def runner_commits(
    kube_setup: KubeSetup, private_pg: tuple[PostgresServer, Database]
) -> Iterator[SimulatedCommits]:
    """The runner's final commit for the pods KWOK succeeds (their simulated container
    cannot make it, and without it no attempt is a success); it rides through the same
    API server and PostgreSQL restarts as the controller."""
    _, database = private_pg
    with SimulatedCommits(kube_setup.kube.api_client, kube_setup.namespace,
                          database.connect) as simulated:  # fmt: skip
        yield simulated


def test_kubernetes_executor_under_chaos(
    kube_setup: KubeSetup,
    private_pg: tuple[PostgresServer, Database],
    runner_commits: SimulatedCommits,
    start_controller: Start,
    chaos: ChaosRun,
) -> None:
    """Many simulated jobs through the Kubernetes executor while the controller, PostgreSQL
    and the API server die under it and Jobs/pods vanish; then the invariants."""
    pg, database = private_pg
    sql = Sql(database)
    rng = chaos.rng
    tally = Tally("kubernetes executor, KWOK pods", chaos.seed)
    base_env = {
        **kube_setup.env, **database.env(),
        "MAX_CONCURRENT_JOBS": "40", "LAUNCH_CONCURRENCY": "4",
        "KUBE_WATCH_TIMEOUT_SECONDS": "10", "KUBE_API_TIMEOUT_SECONDS": "10",
    }  # fmt: skip
    tracker = JobTracker(kube_setup.kube.kubeconfig, kube_setup.namespace)
    controllers = Controllers(
        start_controller,
        lambda: {**base_env, "RUNNER_POD_ANNOTATIONS": pod_fate(rng)},
        rng,
        first_env={**base_env, "RUNNER_POD_ANNOTATIONS": pod_fate(rng, first=True)},
    )

    total = max(30, int(chaos.seconds))
    added = 0
    api_restarts_left = max(1, int(chaos.seconds // 60))

    def restart_apiserver() -> bool:
        nonlocal api_restarts_left
        if api_restarts_left <= 0:
            return False
        api_restarts_left -= 1
        kube_setup.kube.restart_apiserver()
        return True

    def delete(kind: str) -> Callable[[], bool]:
        def fault() -> bool:
            try:
                items = kube_setup.jobs() if kind == "job" else kube_setup.pods()
                # In-flight objects only: deleting a finished Job or pod tests nothing.
                active = [
                    i
                    for i in items
                    if not i["metadata"].get("deletionTimestamp") and in_flight(kind, i)
                ]
                if not active:
                    return False
                name = rng.choice(active)["metadata"]["name"]
                if kind == "job":
                    tracker.relist()
                    kube_setup.batch.delete_namespaced_job(
                        name, kube_setup.namespace, propagation_policy="Background"
                    )
                else:
                    kube_setup.core.delete_namespaced_pod(name, kube_setup.namespace)
            except Exception:  # e.g. gone meanwhile, API server restarting
                return False
            return True

        return fault

    faults: dict[str, tuple[float, Callable[[], bool]]] = {
        "controller SIGKILL": (4, controllers.kill),
        "postgres fast restart": (1.5, restart_postgres(pg, rng, crash=False)),
        "postgres crash": (1.5, restart_postgres(pg, rng, crash=True)),
        "apiserver restart": (1, restart_apiserver),
        "job deleted": (3, delete("job")),
        "pod deleted": (2, delete("pod")),
        "row cancelled": (2, lambda: sql.cancel_one(rng.choice)),
    }

    def feed() -> None:
        nonlocal added
        if added >= total:
            return
        batch = min(total - added, rng.randint(3, 10))
        sql.add_jobs(batch, "/uploads/simulated.mp4", max_attempts=4)
        added += batch

    started = time.monotonic()
    inject(chaos, tally, faults, feed, pause=(0.5, 3))
    if added < total:
        sql.add_jobs(total - added, "/uploads/simulated.mp4", max_attempts=4)
    print(f"faults stopped after {time.monotonic() - started:.0f} s; settling")
    # Bounded, and generous: a simulated attempt takes ~1 min when the testbed is shared
    # with a load test; each retry wave adds one.
    settle(sql, timeout=480, keep_alive=controllers.keep_alive)
    print(f"settled after {time.monotonic() - started:.0f} s")
    runner_commits.stop()
    tally.notes.append(
        f"simulated runner commits: {runner_commits.committed} (fenced out:"
        f" {runner_commits.fenced}; errors ridden through: {runner_commits.errors})"
    )
    rows = sql.rows()
    check_rows(tally, rows)
    check_runners(tally, rows, tracker.by_attempt())
    tally.report()


# ---------------------------------------------------------------- local scenario ---


def test_local_executor_under_chaos(
    private_pg: tuple[PostgresServer, Database],
    dav: WebDAVServer,
    controller_env: dict[str, str],
    media_dir: Path,
    start_controller: Start,
    chaos: ChaosRun,
) -> None:
    """Fewer, real jobs (real jobrunner, FFmpeg, whisper.cpp) through the local executor
    while the controller and PostgreSQL die and WebDAV fails or stalls requests."""
    pg, database = private_pg
    sql = Sql(database)
    rng = chaos.rng
    tally = Tally("local executor, real jobrunner", chaos.seed)
    source = "/uploads/chaos/talk.wav"
    dav.put_file(source, make_media("audio_wav", media_dir))
    env = {**controller_env, **database.env(), "MAX_CONCURRENT_JOBS": "2"}
    # A real (tiny) model writes real segments, so "no subtitle duplicated" has something
    # to check; the weightless test model writes none.
    real_model = MODELS / "ggml-tiny.en.bin"
    if real_model.exists():
        env["WHISPER_MODEL"] = str(real_model)
    controllers = Controllers(start_controller, lambda: env, rng)

    def dav_fail() -> bool:
        dav.faults.fail(rng.randint(1, 3), status=rng.choice((500, 502, 503)))
        return True

    def dav_stall() -> bool:
        dav.faults.stall(rng.randint(1, 2), seconds=rng.uniform(0.5, 3))
        return True

    faults: dict[str, tuple[float, Callable[[], bool]]] = {
        "controller SIGKILL": (3, controllers.kill),
        "postgres fast restart": (1, restart_postgres(pg, rng, crash=False)),
        "postgres crash": (1, restart_postgres(pg, rng, crash=True)),
        "webdav fail": (2, dav_fail),
        "webdav stall": (2, dav_stall),
        "row cancelled": (1, lambda: sql.cancel_one(rng.choice)),
    }
    total = max(6, int(chaos.seconds // 5))
    added = 0

    def feed() -> None:
        nonlocal added
        if added >= total:
            return
        batch = min(total - added, rng.randint(1, 3))
        sql.add_jobs(batch, source, max_attempts=6)
        added += batch

    inject(chaos, tally, faults, feed, pause=(1, 4))
    if added < total:
        sql.add_jobs(total - added, source, max_attempts=6)
    dav.faults.clear()

    settle(sql, timeout=300, keep_alive=controllers.keep_alive)
    for proc in controllers.all:
        if proc.alive():
            proc.stop(timeout=60)
    rows = sql.rows()
    check_rows(tally, rows)
    runners: dict[tuple[int, int], set[str]] = {}
    for index, proc in enumerate(controllers.all):
        for event in proc.events("runner_process_started"):
            token = (int(event["job_id"]), int(event["attempt"]))
            runners.setdefault(token, set()).add(f"{index}:{event['pid']}")
    check_runners(tally, rows, runners)
    check_subtitles(tally, sql, rows, expect_segments=real_model.exists())
    tally.report()


def check_subtitles(
    tally: Tally,
    sql: Sql,
    rows: dict[int, tuple[str, int, str | None, str | None, Any]],
    expect_segments: bool,
) -> None:
    """Invariant 4: no segment twice, and every completed media has one run's segments
    (all media are the same file, so their counts must agree)."""
    for media_id, start, count in sql.run(
        "SELECT media_id, start_time_ms, count(*) FROM dharma.subtitles"
        " GROUP BY media_id, start_time_ms, end_time_ms, text HAVING count(*) > 1"
    ):
        tally.violations.append(f"subtitles duplicated: media {media_id} at {start} ms x{count}")
    counts = dict(sql.run("SELECT media_id, count(*) FROM dharma.subtitles GROUP BY media_id"))
    completed = {counts.get(row[4], 0) for row in rows.values() if row[0] == "completed"}
    tally.notes.append(f"subtitle rows per completed media: {sorted(completed)}")
    if expect_segments and 0 in completed:
        tally.violations.append("a completed media has no subtitles (real model in use)")
    if len(completed) > 1:
        tally.violations.append(f"completed media differ in subtitle count: {sorted(completed)}")
