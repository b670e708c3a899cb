"""Crash-safety and HA of the Kubernetes executor on the real control plane: the controller
SIGKILLed at the two critical moments (test-only fault hooks, controller/faults.py), two
replicas behind a Lease, the API server restarting under the watches, a watch resuming from
a compacted resourceVersion (410 Gone), and PostgreSQL restarting."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from kubernetes import client

from controller.informer import Gone, Informer
from controller.jobspec import MANAGED_SELECTOR
from controller.kubestate import trim_job
from devtools.controller_helpers import ControllerProcess, eventually
from devtools.kwok import DELAY, FATE
from devtools.services import PostgresServer
from tests.conftest import Queue
from tests.controller_fixtures import KubeSetup
from tests.e2e.test_controller_outcomes import (  # noqa: F401 - runner_commits: a fixture
    add_job,
    fate,
    finished,
    row,
    runner_commits,
)

#: Every test here ends in success, which needs the runner's commit: KWOK's simulated
#: container cannot make it, so `runner_commits` (devtools/simulated_runner.py) plays it.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150), pytest.mark.usefixtures("runner_commits")]
Start = Callable[..., ControllerProcess]


def test_crash_between_claim_and_job_creation(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """SIGKILL right after the claim committed: no Job exists. The restarted controller
    creates exactly one Job for that attempt (same attempt number, deterministic name)."""
    job_id = add_job(queue)
    crashing = start_controller({**kube_setup.env, "DHARMA_FAULT_CRASH_AFTER_CLAIM": "1"})
    assert crashing.wait(timeout=60) == -9
    assert row(queue, job_id)["status"] == "processing"
    assert kube_setup.job_names() == []
    start_controller(kube_setup.env)
    done = eventually(lambda: finished(queue, job_id), "the job to finish")
    assert (done["status"], done["attempts"]) == ("completed", 1)
    assert kube_setup.job_names() == [kube_setup.runner_name(job_id, 1)]


def test_crash_after_the_job_finished_before_recording(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """SIGKILL right before the outcome is written: the Job has completed. The restart
    adopts it and records the outcome once; nothing is launched again."""
    job_id = add_job(queue)
    crashing = start_controller({**kube_setup.env, "DHARMA_FAULT_CRASH_BEFORE_RECORD": "1"})
    assert crashing.wait(timeout=60) == -9
    assert row(queue, job_id)["status"] == "processing"
    restarted = start_controller(kube_setup.env)
    done = eventually(lambda: finished(queue, job_id), "the job to be recorded")
    assert (done["status"], done["attempts"]) == ("completed", 1)
    assert kube_setup.job_names() == [kube_setup.runner_name(job_id, 1)]
    assert len(restarted.events("attempt_succeeded", job_id=job_id)) == 1
    assert not restarted.events("runner_launched")


def test_two_replicas_one_job_per_attempt(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Two replicas with LEADER_ELECTION: only the Lease holder acts, every attempt gets one
    Job. When the leader stops (SIGTERM releases the Lease) the other takes over."""
    env = {**kube_setup.env, "LEADER_ELECTION": "true",
           "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "300ms"})}  # fmt: skip
    first = start_controller({**env, "POD_NAME": "replica-a"})
    second = start_controller({**env, "POD_NAME": "replica-b"})
    jobs = [add_job(queue) for _ in range(4)]
    eventually(lambda: all(finished(queue, j) for j in jobs), "the first batch", timeout=90)
    leaders = {e["identity"] for p in (first, second) for e in p.events("leadership_changed")
               if e["leader"]}  # fmt: skip
    assert len(leaders) == 1
    leader, standby = (first, second) if leaders == {"replica-a"} else (second, first)
    claimed_by = {r[0] for r in queue.rows("SELECT DISTINCT claimed_by FROM dharma.stt_jobs")}
    assert claimed_by == leaders
    assert leader.stop() == 0
    more = [add_job(queue) for _ in range(3)]
    eventually(lambda: all(finished(queue, j) for j in more), "the second batch", timeout=90)
    assert standby.events("leadership_changed", leader=True)
    expected = sorted(kube_setup.runner_name(j, 1) for j in jobs + more)
    assert kube_setup.job_names() == expected
    assert {row(queue, j)["status"] for j in jobs + more} == {"completed"}


def test_api_server_restart_loses_nothing(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """kube-apiserver restarts while a Job runs: the watches resume or relist, the running
    Job's outcome is recorded, and work enqueued afterwards still runs."""
    env = {**kube_setup.env, "KUBE_WATCH_TIMEOUT_SECONDS": "5",
           "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "4s"})}  # fmt: skip
    controller = start_controller(env)
    first = add_job(queue)
    eventually(lambda: row(queue, first)["runner_name"], "the first Job")
    kube_setup.kube.restart_apiserver()
    # Whether the watches saw a dropped connection (relist) or a cleanly ended stream
    # (resume from their resourceVersion) depends on how the server shut down; both must
    # lose nothing, which is what follows.
    done = eventually(lambda: finished(queue, first), "the first job", timeout=90)
    assert done["status"] == "completed"
    second = add_job(queue)
    assert eventually(lambda: finished(queue, second), "the second job")["status"] == "completed"
    assert controller.alive()


def test_watch_from_a_compacted_version_relists(kube_setup: KubeSetup) -> None:
    """The real API server answers a watch from an expired resourceVersion with 410 Gone;
    the informer recognises it (and its loop then relists)."""
    batch = client.BatchV1Api(kube_setup.kube.api_client)
    changes = threading.Event()
    informer = Informer(
        "jobs", batch.list_namespaced_job, kube_setup.namespace, MANAGED_SELECTOR, trim_job,
        on_change=changes.set, on_relist=lambda: None, api_timeout=10, watch_timeout=5,
    )  # fmt: skip
    with pytest.raises(Gone):
        informer._watch("1")


def test_postgres_restart_under_the_kubernetes_executor(
    queue: Queue,
    kube_setup: KubeSetup,
    pg_server: PostgresServer,
    start_controller: Start,
) -> None:
    """PostgreSQL restarts while a Job runs: the controller keeps serving, records the Job's
    outcome once the database is back, and claims new work."""
    env = {**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "3s"})}
    controller = start_controller(env)
    first = add_job(queue)
    eventually(lambda: row(queue, first)["runner_name"], "the first Job")
    queue.conn.close()
    pg_server.restart()
    queue.conn = queue.db.connect()
    assert eventually(lambda: finished(queue, first), "the first job")["status"] == "completed"
    second = add_job(queue)
    assert eventually(lambda: finished(queue, second), "the second job")["status"] == "completed"
    assert controller.alive()
    assert controller.events("listen_lost")


def test_sigterm_leaves_jobs_running_and_the_next_controller_adopts_them(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """SIGTERM stops the controller cleanly without touching its running Job; the next
    controller adopts that Job (no second launch) and records its outcome."""
    env = {**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "5s"})}
    first = start_controller(env)
    job_id = add_job(queue)
    name = eventually(lambda: row(queue, job_id)["runner_name"], "the Job")
    assert first.stop() == 0
    assert kube_setup.job_names() == [name]
    assert row(queue, job_id)["status"] == "processing"
    second = start_controller(env)
    done = eventually(lambda: finished(queue, job_id), "the adopted Job's outcome")
    assert (done["status"], done["attempts"]) == ("completed", 1)
    assert kube_setup.job_names() == [name]
    assert not second.events("runner_launched")
