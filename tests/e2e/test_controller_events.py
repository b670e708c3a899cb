"""The controller's Events on runner Jobs, on the real control plane (controller/events.py):
each attempt's Job tells its story to `kubectl describe job/...` — claimed, then retrying or
failed with the reason, or cancelled. KWOK plays the pods' fates (as in
test_controller_outcomes.py); the Events are listed as `kubectl describe` finds them (core/v1,
fieldSelector on involvedObject), though the controller posts them through events.k8s.io/v1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from devtools.controller_helpers import ControllerProcess, eventually
from devtools.kwok import EXIT_CODE, FATE, MESSAGE
from tests.conftest import Queue
from tests.controller_fixtures import KubeSetup
from tests.e2e.test_controller_outcomes import add_job, fate, finished, row

#: The runs take seconds; the margins are for a control plane another benchmark is loading.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
Start = Callable[..., ControllerProcess]


def events(kube_setup: KubeSetup, job_name: str) -> list[dict[str, Any]]:
    """The Events on the Job `job_name`, oldest first."""
    response = kube_setup.core.list_namespaced_event(
        kube_setup.namespace,
        field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name}",
        _preload_content=False,
    )
    items: list[dict[str, Any]] = json.loads(response.data)["items"]
    ours = [e for e in items if e.get("reportingComponent") == "dharma.stream/controller"]
    return sorted(ours, key=lambda e: e.get("eventTime") or "")


def reasons(kube_setup: KubeSetup, job_name: str, count: int) -> list[dict[str, Any]]:
    """Wait for `count` Events of the controller on `job_name` (they are posted off the loop,
    so shortly after the row is written), and return them."""

    def enough() -> list[dict[str, Any]] | None:
        found = events(kube_setup, job_name)
        return found if len(found) >= count else None

    return eventually(enough, f"{count} Events on Job {job_name}")


def job_uid(kube_setup: KubeSetup, job_name: str) -> str:
    job = kube_setup.batch.read_namespaced_job(job_name, kube_setup.namespace)
    return str(job.metadata.uid)


def test_a_failed_job_tells_why(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Exit 10 with a termination message: Claimed, then Failed (Warning) with the reason and
    the runner's words, on the Job by uid, so `kubectl describe job` shows them."""
    job_id = add_job(queue)
    annotations = {FATE: "fail", EXIT_CODE: "10", MESSAGE: "source is not readable media: x"}
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**annotations)})
    done = eventually(lambda: finished(queue, job_id), "the job to fail", timeout=120)
    assert done["status"] == "failed"
    name = kube_setup.runner_name(job_id, 1)
    claimed, failed = reasons(kube_setup, name, 2)
    assert [claimed["reason"], failed["reason"]] == ["Claimed", "Failed"]
    assert (claimed["type"], failed["type"]) == ("Normal", "Warning")
    limit = kube_setup.env["RUNNER_MEMORY_LIMIT"]
    assert claimed["message"] == f"claimed: attempt 1 of 3, memory limit {limit}"
    assert failed["message"] == "runner_error_permanent: source is not readable media: x"
    uid = job_uid(kube_setup, name)
    for event in (claimed, failed):
        assert event["involvedObject"]["uid"] == uid
        assert event["metadata"]["labels"]["dharma.stream/job-id"] == str(job_id)
    described = kube_setup.kube.kubectl("-n", kube_setup.namespace, "describe", "job", name)
    assert "Failed" in described.stdout and "source is not readable media: x" in described.stdout


def test_a_retried_job_tells_each_attempt(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """Exit 11: each attempt's Job has its own story — attempt 1 Claimed then Retrying (with
    the delay and the tally), attempt 2 Claimed then Failed (no attempts left)."""
    job_id = add_job(queue, max_attempts=2)
    annotations = {FATE: "fail", EXIT_CODE: "11", MESSAGE: "WebDAV answered 503"}
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**annotations)})
    done = eventually(lambda: finished(queue, job_id), "the job to fail", timeout=120)
    assert (done["status"], done["attempts"]) == ("failed", 2)
    first = reasons(kube_setup, kube_setup.runner_name(job_id, 1), 2)
    second = reasons(kube_setup, kube_setup.runner_name(job_id, 2), 2)
    assert [e["reason"] for e in first] == ["Claimed", "Retrying"]
    assert [e["reason"] for e in second] == ["Claimed", "Failed"]
    retrying = first[1]
    assert retrying["type"] == "Warning"
    assert retrying["message"].startswith(
        "runner_error_temporary: WebDAV answered 503 (attempt 1 of 2; retrying in "
    )
    assert second[0]["message"].startswith("claimed: attempt 2 of 2")
    assert second[1]["message"] == (
        "runner_error_temporary: WebDAV answered 503 (attempt 2 of 2; no attempts left)"
    )


def test_a_cancelled_job_says_so(
    queue: Queue, kube_setup: KubeSetup, start_controller: Start
) -> None:
    """The Event outlives the Job the cancellation deletes."""
    job_id = add_job(queue)
    start_controller({**kube_setup.env, "RUNNER_POD_ANNOTATIONS": fate(**{FATE: "external"})})
    name = kube_setup.runner_name(job_id, 1)
    eventually(lambda: row(queue, job_id)["runner_name"] == name, "the Job to be recorded")
    queue.row("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s RETURNING id", job_id)
    claimed, cancelled = reasons(kube_setup, name, 2)
    assert (claimed["reason"], cancelled["reason"]) == ("Claimed", "Cancelled")
    assert cancelled["message"] == "the job was cancelled; stopping its runner"
    eventually(lambda: not kube_setup.job_names(), "the Job to be deleted")
