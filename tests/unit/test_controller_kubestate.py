"""Job + pods (API dicts, shaped as the API server and KWOK produce them) -> Observation."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from controller.kubestate import (
    DELETED_MARK,
    current_pod,
    is_finished,
    observe_job,
    parse_time,
    trim_job,
    trim_pod,
)
from controller.model import Phase
from controller.reconcile import Wait, decide
from tests.unit.test_reconcile import SETTINGS, row

T0 = "2026-01-01T12:00:00Z"
T1 = "2026-01-01T12:00:05Z"


def job(*conditions: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "dharma-stt-7-1", "creationTimestamp": T0}
    if deleting:
        meta["deletionTimestamp"] = T1
    return {
        "metadata": meta,
        "spec": {
            "activeDeadlineSeconds": 900,
            "template": {"spec": {"containers": [{
                "name": "runner", "image": "reg/runner:1",
                "resources": {"limits": {"memory": "2Gi"}}}]}},
        },
        "status": {"conditions": [{"status": "True", **c} for c in conditions]},
    }  # fmt: skip


def pod(phase: str, state: dict[str, Any] | None = None, name: str = "p1", created: str = T0,
        conditions: list[dict[str, Any]] | None = None, **meta: Any) -> dict[str, Any]:  # fmt: skip
    statuses = [{"name": "runner", "state": state}] if state else []
    return {
        "metadata": {"name": name, "creationTimestamp": created, **meta},
        "status": {"phase": phase, "startTime": T1, "containerStatuses": statuses,
                   "conditions": conditions or []},
    }  # fmt: skip


def terminated(code: int, reason: str = "Error", message: str | None = None) -> dict[str, Any]:
    return {"terminated": {"exitCode": code, "reason": reason, "message": message,
                           "finishedAt": T1}}  # fmt: skip


def test_no_job() -> None:
    assert observe_job(None, []).phase is Phase.NONE


def test_complete() -> None:
    seen = observe_job(job({"type": "Complete"}), [pod("Succeeded", terminated(0, "Completed"))])
    assert (seen.phase, seen.exit_code) == (Phase.SUCCEEDED, 0)


def test_failed_by_pod_failure_policy_with_message() -> None:
    seen = observe_job(
        job({"type": "FailureTarget", "reason": "PodFailurePolicy"}),
        [pod("Failed", terminated(10, message="source is not readable media"))],
    )
    assert (seen.phase, seen.exit_code, seen.message) == (
        Phase.FAILED, 10, "source is not readable media")  # fmt: skip


def test_oom_killed_carries_the_limit() -> None:
    seen = observe_job(job(), [pod("Failed", terminated(137, "OOMKilled"))])
    assert (seen.phase, seen.reason, seen.memory_limit) == (Phase.FAILED, "OOMKilled", "2Gi")


def test_deadline_exceeded() -> None:
    seen = observe_job(job({"type": "Failed", "reason": "DeadlineExceeded"}),
                       [pod("Failed", terminated(143))])  # fmt: skip
    assert (seen.phase, seen.reason, seen.deadline_seconds) == (
        Phase.FAILED, "DeadlineExceeded", 900)  # fmt: skip


def test_job_being_deleted() -> None:
    seen = observe_job(job(deleting=True), [pod("Running", {"running": {"startedAt": T1}})])
    assert (seen.phase, seen.deleted_kind) == (Phase.DELETED, "Job")


def test_pod_deleted_under_the_job() -> None:
    victim = pod("Failed", terminated(143), deletionTimestamp=T1)
    seen = observe_job(job({"type": "Failed", "reason": "PodFailurePolicy"}), [victim])
    assert (seen.phase, seen.deleted_kind, seen.exit_code) == (Phase.DELETED, "pod of Job", 143)
    tombstone = {**pod("Running", {"running": {}}), DELETED_MARK: True}
    seen = observe_job(job({"type": "Failed", "reason": "PodFailurePolicy"}), [tombstone])
    assert (seen.phase, seen.deleted_kind) == (Phase.DELETED, "pod of Job")


def test_pod_deleted_before_the_job_says_why_waits_for_the_job() -> None:
    """The pod and Job watches are independent: a pod the Job controller deleted at the
    deadline can be seen before the Job's DeadlineExceeded. Not a verdict yet."""
    victim = pod("Failed", terminated(143), deletionTimestamp=T1)
    assert observe_job(job(), [victim]).phase is Phase.RUNNING
    deadline = observe_job(job({"type": "Failed", "reason": "DeadlineExceeded"}), [victim])
    assert (deadline.phase, deadline.reason) == (Phase.FAILED, "DeadlineExceeded")


def test_running_and_pending_reasons() -> None:
    assert (
        observe_job(job(), [pod("Running", {"running": {"startedAt": T1}})]).phase is Phase.RUNNING
    )
    no_pod = observe_job(job(), [])
    assert (no_pod.phase, no_pod.waiting_reason, no_pod.since) == (
        Phase.PENDING, "NoPodYet", parse_time(T0))  # fmt: skip
    pulling = observe_job(job(), [pod("Pending", {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}})])  # fmt: skip
    assert (pulling.phase, pulling.waiting_reason, pulling.image) == (
        Phase.PENDING, "ImagePullBackOff", "reg/runner:1")  # fmt: skip
    unschedulable = observe_job(job(), [pod("Pending", conditions=[{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/3 nodes are available"}])])  # fmt: skip
    assert (unschedulable.waiting_reason, unschedulable.message) == (
        "Unschedulable", "0/3 nodes are available")  # fmt: skip


def test_disrupted_pod_is_replaced_not_failed() -> None:
    disrupted = pod("Failed", terminated(143), name="old",
                    conditions=[{"type": "DisruptionTarget", "status": "True"}])  # fmt: skip
    replacement = pod("Pending", name="new", created=T1)
    assert (current_pod([replacement, disrupted]) or {}).get("metadata", {}).get("name") == "new"
    assert observe_job(job(), [disrupted, replacement]).phase is Phase.PENDING
    # Alone (replacement not created yet), a disrupted pod is not a failure either.
    assert observe_job(job(), [disrupted]).phase is Phase.PENDING


def test_is_finished() -> None:
    assert is_finished(job({"type": "Complete"}))
    assert is_finished(job({"type": "FailureTarget"}))
    assert not is_finished(job({"type": "Suspended"}))


HOURS_AGO = "2026-01-01T10:00:00Z"
DISRUPTED_AT = "2026-01-01T12:00:00Z"


def _drained(**condition: str) -> dict[str, Any]:
    return pod("Failed", terminated(143), name="old", created=HOURS_AGO, conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
         **condition}])  # fmt: skip


@pytest.mark.parametrize(
    ("pods", "since"),
    [
        ([_drained(lastTransitionTime=DISRUPTED_AT)], DISRUPTED_AT),
        # No transition time kept: the container's end is the latest sign of the disruption.
        ([_drained()], T1),
        # The replacement is observed: its own creation time counts.
        ([_drained(lastTransitionTime=DISRUPTED_AT), pod("Pending", name="new", created=T1)],
         T1),
    ],
    ids=["disruption time", "termination time", "replacement"],
)  # fmt: skip
def test_disrupted_pod_awaiting_replacement_is_waited_out(
    pods: list[dict[str, Any]], since: str
) -> None:
    """A runner drained or preempted 2 h after its pod was created, before the Job's
    replacement pod is seen: not "still Pending after 7200 s" (which deleted the Job)."""
    seen = observe_job(trim_job(job()), [trim_pod(p) for p in pods])
    assert (seen.phase, seen.since) == (Phase.PENDING, parse_time(since))
    now = (parse_time(T1) or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(seconds=30)
    started = now - dt.timedelta(hours=2)
    assert isinstance(decide(row(processing_started_at=started), seen, now, SETTINGS), Wait)


OWN_LIMIT = "Pod ephemeral local storage usage exceeds the total limit of containers 2Gi."
NODE_PRESSURE = "The node was low on resource: ephemeral-storage."


def _evicted(message: str) -> dict[str, Any]:
    evicted = pod("Failed", terminated(137, "ContainerStatusUnknown"))
    evicted["status"].update(reason="Evicted", message=message)
    return evicted


@pytest.mark.parametrize("message", [OWN_LIMIT, NODE_PRESSURE], ids=["own usage", "node pressure"])
@pytest.mark.parametrize(
    "conditions",
    [({"type": "FailureTarget", "reason": "PodFailurePolicy"},), ()],
    ids=["job failed", "pod seen first"],
)
def test_evicted_pod_carries_the_kubelets_message(
    message: str, conditions: tuple[dict[str, Any], ...]
) -> None:
    """A kubelet eviction (its own ephemeral storage over the limit, or the node short of
    disk) is not "exit 137 without a message": the reason and the kubelet's words survive
    the cache's trimming."""
    seen = observe_job(trim_job(job(*conditions)), [trim_pod(_evicted(message))])
    assert (seen.phase, seen.reason, seen.message, seen.exit_code) == (
        Phase.FAILED, "Evicted", message, 137)  # fmt: skip
