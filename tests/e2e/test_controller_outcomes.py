"""The controller with the Kubernetes executor on the real control plane (kube-apiserver,
kube-controller-manager's Job controller, kube-scheduler; KWOK plays the nodes and each
pod's fate, chosen through RUNNER_POD_ANNOTATIONS): every way an attempt can end, as the row
records it. Namespaces enforce the `restricted` Pod Security Standard, so the API server
itself rejects any pod of ours that is not hardened.

The runner does not really run here (KWOK simulates the container); the test that runs the
real jobrunner from the pod spec is test_controller_real_runner.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.informer import Informer
from controller.kube import POD_FIELD_SELECTOR
from controller.kubestate import DELETED_MARK, trim_pod
from devtools.controller_helpers import ControllerProcess, eventually
from devtools.kwok import DELAY, EXIT_CODE, FATE, MESSAGE
from devtools.services import Database
from devtools.simulated_runner import SimulatedCommits
from tests.conftest import Queue
from tests.controller_fixtures import KubeSetup

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
Start = Callable[..., ControllerProcess]


def add_job(queue: Queue, max_attempts: int = 3) -> int:
    """A row whose media need not exist: KWOK decides the pod's fate, not the media."""
    with queue.conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path)"
            " VALUES ('talks', '/uploads/simulated.mp4') RETURNING id"
        )
        media_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO dharma.stt_jobs (media_id, max_attempts) VALUES (%s, %s) RETURNING id",
            (media_id, max_attempts),
        )
        job_id: int = cur.fetchone()[0]
    return job_id


def row(queue: Queue, job_id: int) -> dict[str, Any]:
    values = queue.row(
        "SELECT status, attempts, failure_reason, error_message, runner_name, memory_limit"
        " FROM dharma.stt_jobs WHERE id = %s",
        job_id,
    )
    keys = ("status", "attempts", "failure_reason", "error_message", "runner_name", "memory_limit")
    return dict(zip(keys, values, strict=True))


def finished(queue: Queue, job_id: int) -> dict[str, Any] | None:
    current = row(queue, job_id)
    return current if current["status"] in ("completed", "failed") else None


def fate(**annotations: str) -> str:
    return json.dumps(annotations)


@pytest.fixture
def runner_commits(kube_setup: KubeSetup, db: Database) -> Iterator[SimulatedCommits]:
    """Play the runner's final fenced commit (`result_attempt`) for this namespace's pods
    that KWOK will succeed, which their simulated container cannot make: the controller
    records success only over that commit, never for a Job that merely completed. Pods with
    other fates never commit, so failure tests may use it too."""
    with SimulatedCommits(kube_setup.kube.api_client, kube_setup.namespace, db.connect) as sim:
        yield sim


@pytest.mark.usefixtures("runner_commits")
def test_success(queue: Queue, kube_setup: KubeSetup, start_controller: Start) -> None:
    """A Job that completes: row completed, Job name on the row, labels for `kubectl logs -l`,
    the pod accepted under `restricted` Pod Security."""
    job_id = add_job(queue)
    env = {**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "500ms"})}
    controller = start_controller(env)
    done = eventually(lambda: finished(queue, job_id), "the job to finish")
    assert done["status"] == "completed" and done["attempts"] == 1
    assert done["runner_name"] == kube_setup.runner_name(job_id, 1)
    assert kube_setup.job_names() == [kube_setup.runner_name(job_id, 1)]
    (pod,) = kube_setup.pods(done["runner_name"])
    assert pod["metadata"]["labels"]["dharma.stream/job-id"] == str(job_id)
    assert controller.events("attempt_succeeded", job_id=job_id)


@pytest.mark.usefixtures("runner_commits")
def test_a_succeeded_pod_leaves_the_pod_watch_as_a_tombstone(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """The controller's pod watch leaves out pods that have Succeeded (POD_FIELD_SELECTOR:
    their last three events per Job are never sent). The real API server reports a pod
    leaving a field selector as a DELETED event, which the cache keeps as a tombstone while
    the pod itself is still there, Succeeded; the row is completed from the Job's condition."""
    pods = Informer(
        "pods", kube_setup.core.list_namespaced_pod, kube_setup.namespace, "", trim_pod,
        on_change=lambda: None, on_relist=lambda: None, api_timeout=10, watch_timeout=60,
        tombstones=True, index=lambda p: p["metadata"]["labels"].get("job-name"),
        field_selector=POD_FIELD_SELECTOR,
    )  # fmt: skip
    pods.start()
    try:
        eventually(pods.synced.is_set, "the pod cache")
        job_id = add_job(queue)
        env = {**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "1s"})}
        start_controller(env)
        name = eventually(lambda: row(queue, job_id)["runner_name"], "the Job")
        assert eventually(lambda: finished(queue, job_id), "the job")["status"] == "completed"
        (pod,) = kube_setup.pods(name)
        assert pod["status"]["phase"] == "Succeeded"
        kept = eventually(
            lambda: [p for p in pods.by_index(name) if p.get(DELETED_MARK)], "the tombstone"
        )
        assert [p["metadata"]["name"] for p in kept] == [pod["metadata"]["name"]]
    finally:
        pods.stop()


def test_completed_job_without_the_runners_commit_is_not_a_success(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """A Job that completes while the row never gets this attempt's commit (a Job left from
    a restored database, or not ours): a temporary failure, retried, then failed — never
    `completed`."""
    job_id = add_job(queue, max_attempts=2)
    env = {**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "succeed", DELAY: "300ms"})}
    start_controller(env)
    done = eventually(lambda: finished(queue, job_id), "the job to finish")
    assert (done["status"], done["attempts"], done["failure_reason"]) == (
        "failed", 2, "runner_error_temporary")  # fmt: skip
    assert "the runner exited 0 but did not commit its result" in done["error_message"]


@pytest.mark.usefixtures("runner_commits")  # and yet no success: it commits for no other fate
def test_runner_error_is_recorded_in_its_own_words(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Exit 10 with a termination message: failed at once, the message on the row."""
    job_id = add_job(queue)
    annotations = {FATE: "fail", EXIT_CODE: "10", MESSAGE: "source is not readable media: x"}
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**annotations)})
    done = eventually(lambda: finished(queue, job_id), "the job to fail")
    assert (done["status"], done["attempts"], done["failure_reason"]) == (
        "failed", 1, "runner_error_permanent")  # fmt: skip
    assert done["error_message"] == "source is not readable media: x"


@pytest.mark.usefixtures("runner_commits")  # and yet no success: it commits for no other fate
def test_temporary_error_is_retried_then_gives_up(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Exit 11: retried (one Job per attempt) until max_attempts."""
    job_id = add_job(queue, max_attempts=2)
    annotations = {FATE: "fail", EXIT_CODE: "11", MESSAGE: "WebDAV answered 503"}
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**annotations)})
    done = eventually(lambda: finished(queue, job_id), "the job to fail")
    assert (done["status"], done["attempts"], done["failure_reason"]) == (
        "failed", 2, "runner_error_temporary")  # fmt: skip
    assert done["error_message"] == "WebDAV answered 503 (attempt 2 of 2; no attempts left)"
    assert kube_setup.job_names() == [
        kube_setup.runner_name(job_id, 1),
        kube_setup.runner_name(job_id, 2),
    ]


@pytest.mark.usefixtures("runner_commits")  # and yet no success: it commits for no other fate
def test_oom_killed_retries_with_more_memory(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """OOMKilled: retried with limit x 2 (256Mi -> 512Mi, the cap), then failed with the
    limit in words."""
    job_id = add_job(queue)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "oom"})})
    done = eventually(lambda: finished(queue, job_id), "the job to fail")
    assert (done["status"], done["attempts"], done["failure_reason"]) == (
        "failed", 2, "oom_killed")  # fmt: skip
    assert done["error_message"] == (
        "OOM-killed (memory limit 512Mi); already at RUNNER_MEMORY_LIMIT_MAX (512Mi)"
    )
    limits = {
        j["metadata"]["name"]: j["spec"]["template"]["spec"]["containers"][0]["resources"][
            "limits"]["memory"]
        for j in kube_setup.jobs()
    }  # fmt: skip
    assert limits == {
        kube_setup.runner_name(job_id, 1): "256Mi",
        kube_setup.runner_name(job_id, 2): "512Mi",
    }


@pytest.mark.usefixtures("runner_commits")  # and yet no success: it commits for no other fate
def test_deadline(queue: Queue, kube_setup: KubeSetup, start_controller: Start) -> None:
    """activeDeadlineSeconds ends a runner that never finishes: "timed out after 2 s"."""
    job_id = add_job(queue)
    env = {**kube_setup.env, "JOB_DEADLINE_SECONDS": "2",
           "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})}  # fmt: skip
    start_controller(env)
    done = eventually(lambda: finished(queue, job_id), "the job to time out")
    assert (done["status"], done["attempts"], done["failure_reason"]) == (
        "failed", 1, "deadline_exceeded")  # fmt: skip
    assert done["error_message"] == "timed out after 2 s (JOB_DEADLINE_SECONDS)"


@pytest.mark.parametrize(
    ("extra", "reason", "words"),
    [
        ({"RUNNER_POD_ANNOTATIONS": fate(**{FATE: "image-pull-error"})}, "image_pull_error",
         "image registry.invalid/dharma/jobrunner:test could not be pulled"),
        ({"RUNNER_NODE_SELECTOR": json.dumps({"dharma.test/no-such-node": "x"})},
         "unschedulable", "unschedulable for "),
    ],
    ids=["image-pull-error", "unschedulable"],
)  # fmt: skip
@pytest.mark.usefixtures("runner_commits")  # nor for a pod that never runs
def test_stuck_pending_fails_after_the_timeout(
    queue: Queue,
    kube_setup: KubeSetup,
    start_controller: Start,
    extra: dict[str, str],
    reason: str,
    words: str,
) -> None:
    """A pod Pending beyond PENDING_TIMEOUT_SECONDS fails the attempt with the cluster's
    reason in words, and its Job is deleted."""
    job_id = add_job(queue, max_attempts=1)
    start_controller({**kube_setup.env, "PENDING_TIMEOUT_SECONDS": "3", **extra})
    done = eventually(lambda: finished(queue, job_id), "the pending timeout")
    assert (done["status"], done["failure_reason"]) == ("failed", reason)
    assert words in done["error_message"]
    if reason == "unschedulable":
        assert "didn't match Pod's node affinity/selector" in done["error_message"]
    eventually(lambda: not kube_setup.job_names(), "the stuck Job to be deleted")


def test_cancellation_deletes_the_job_and_its_pods(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    job_id = add_job(queue)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})})
    name = kube_setup.runner_name(job_id, 1)
    eventually(
        lambda: any(p["status"].get("phase") == "Running" for p in kube_setup.pods(name)),
        "the runner pod to run",
    )
    queue.row("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s RETURNING id", job_id)
    eventually(lambda: not kube_setup.job_names(), "the Job to be deleted")
    eventually(lambda: not kube_setup.pods(name), "its pods to be gone")
    assert row(queue, job_id)["status"] == "cancelled"


def test_job_deleted_externally_is_reported_not_relaunched(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Someone deletes the running Job: the row says so, and the next attempt is a new Job
    (a retry with its own name), never a silent re-creation of the same one."""
    job_id = add_job(queue, max_attempts=1)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})})
    name = kube_setup.runner_name(job_id, 1)
    eventually(lambda: row(queue, job_id)["runner_name"] == name, "the Job to be recorded")
    kube_setup.batch.delete_namespaced_job(name, kube_setup.namespace,
                                           propagation_policy="Background")  # fmt: skip
    done = eventually(lambda: finished(queue, job_id), "the deletion to be noticed")
    assert (done["status"], done["failure_reason"]) == ("failed", "deleted_externally")
    assert done["error_message"].startswith(f"Job {name} was deleted externally")
    assert kube_setup.job_names() == []


def test_pod_deleted_externally_is_reported(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Someone deletes the running pod: its Job fails (podFailurePolicy: any exit code) and
    the row says the pod was deleted externally."""
    job_id = add_job(queue, max_attempts=1)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})})
    name = kube_setup.runner_name(job_id, 1)
    pod = eventually(
        lambda: next((p for p in kube_setup.pods(name) if p["status"].get("phase") == "Running"),
                     None),
        "the runner pod to run",
    )  # fmt: skip
    kube_setup.core.delete_namespaced_pod(pod["metadata"]["name"], kube_setup.namespace)
    done = eventually(lambda: finished(queue, job_id), "the deletion to be noticed")
    assert (done["status"], done["failure_reason"]) == ("failed", "deleted_externally")
    assert done["error_message"].startswith(f"pod of Job {name} was deleted externally")
