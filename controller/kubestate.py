"""Turn a Job and its pods (raw API dicts from the watch cache) into an `Observation`.

Pure, so every shape Kubernetes produces — a Job that is Complete, Failed by its deadline or
by the podFailurePolicy, a pod OOMKilled, stuck in ErrImagePull, unschedulable, deleted
under a running Job, a disrupted pod replaced, a pod evicted by the kubelet — is unit-tested
from dicts (tests/unit/test_controller_kubestate.py).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from controller.jobspec import CONTAINER_NAME
from controller.model import (
    NOT_FOUND,
    REASON_DEADLINE,
    REASON_EVICTED,
    REASON_OOM,
    REASON_UNSCHEDULABLE,
    Observation,
    Phase,
    RunnerKey,
)
from dharma_common.contract import (
    LABEL_ATTEMPT,
    LABEL_INSTANCE,
    LABEL_JOB_ID,
    LABEL_MANAGED_BY,
    MANAGED_BY,
)

#: Set by the pod cache on a pod that was deleted (a tombstone), so "deleted externally"
#: can still be told after the object is gone.
DELETED_MARK = "_dharma_deleted"
Obj = dict[str, Any]


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _true_conditions(obj: Obj) -> dict[str, Obj]:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return {c["type"]: c for c in conditions if c.get("status") == "True"}


def _container(spec: Obj) -> Obj:
    containers = spec.get("containers") or [{}]
    for container in containers:
        if container.get("name") == CONTAINER_NAME:
            return dict(container)
    return dict(containers[0])


def _container_status(pod: Obj) -> Obj:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER_NAME:
            return dict(status)
    return dict(statuses[0]) if statuses else {}


def _was_deleted(pod: Obj) -> bool:
    return bool(pod.get(DELETED_MARK) or pod.get("metadata", {}).get("deletionTimestamp"))


def _disrupted(pod: Obj) -> bool:
    return "DisruptionTarget" in _true_conditions(pod)


def foreign_labels(job: Obj, key: RunnerKey, instance_label: str) -> str | None:
    """Which of the labels that make a Job this attempt's runner differ (job id, attempt,
    managed-by, instance), as "label=value, ..."; None if it is ours. A Job with the
    deterministic name is not necessarily ours (another installation's, someone else's), and
    adopting it would record its outcome as this attempt's. `instance_label` is this
    installation's `dharma.stream/instance` value (controller/jobspec.py `Instance.label`)."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    expected = {LABEL_JOB_ID: str(key.job_id), LABEL_ATTEMPT: str(key.attempt),
                LABEL_MANAGED_BY: MANAGED_BY, LABEL_INSTANCE: instance_label}  # fmt: skip
    wrong = [f"{name}={labels.get(name, '<unset>')}"
             for name, value in expected.items() if labels.get(name) != value]  # fmt: skip
    return ", ".join(wrong) or None


def _disrupted_at(pod: Obj) -> dt.datetime | None:
    """When a disrupted pod was disrupted: its DisruptionTarget condition's transition,
    else the latest time the pod reports (container end, deletion)."""
    condition = _true_conditions(pod).get("DisruptionTarget") or {}
    terminated = (_container_status(pod).get("state") or {}).get("terminated") or {}
    for value in (
        condition.get("lastTransitionTime"),
        terminated.get("finishedAt"),
        (pod.get("metadata") or {}).get("deletionTimestamp"),
    ):
        moment = parse_time(value)
        if moment is not None:
            return moment
    return None


def current_pod(pods: list[Obj]) -> Obj | None:
    """The pod that speaks for the attempt: the newest one not replaced after a disruption."""
    if not pods:
        return None
    ordered = sorted(pods, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "")
    undisrupted = [p for p in ordered if not _disrupted(p)]
    return (undisrupted or ordered)[-1]


def _finished(
    base: Observation, pod: Obj | None, job_reason: str | None, job_message: str | None
) -> Observation:
    """A failed attempt, from the pod's terminated state when there is one."""
    terminated = (_container_status(pod).get("state") or {}).get("terminated") if pod else None
    deleted = pod is not None and _was_deleted(pod)
    status = (pod.get("status") or {}) if pod else {}
    if status.get("reason") == REASON_EVICTED and not deleted:
        # The kubelet killed it (137, no termination message): its own words say why, and
        # whether the same attempt would be evicted again (reconcile decides).
        return Observation(
            Phase.FAILED, runner_name=base.runner_name, reason=REASON_EVICTED,
            message=(status.get("message") or "").strip() or None,
            exit_code=(terminated or {}).get("exitCode"), memory_limit=base.memory_limit,
            image=base.image,
        )  # fmt: skip
    if terminated:
        code = terminated.get("exitCode")
        reason = terminated.get("reason")
        message = (terminated.get("message") or "").strip() or None
        if deleted and code != 0 and reason != REASON_OOM:
            return Observation(
                Phase.DELETED, runner_name=base.runner_name, deleted_kind="pod of Job",
                message=message, exit_code=code,
            )  # fmt: skip
        return Observation(
            Phase.FAILED, runner_name=base.runner_name, exit_code=code, reason=reason,
            message=message, memory_limit=base.memory_limit,
            deadline_seconds=base.deadline_seconds, image=base.image,
        )  # fmt: skip
    if deleted:
        return Observation(Phase.DELETED, runner_name=base.runner_name, deleted_kind="pod of Job")
    return Observation(
        Phase.FAILED, runner_name=base.runner_name, reason=job_reason, message=job_message,
        memory_limit=base.memory_limit, deadline_seconds=base.deadline_seconds,
    )  # fmt: skip


#: The conditions of a Job whose work is done.
_SUCCESS = frozenset({"Complete", "SuccessCriteriaMet"})


def observe_job(job: Obj | None, pods: list[Obj]) -> Observation:
    """The state of one attempt from its Job and the pods the Job made."""
    if job is None:
        return NOT_FOUND
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    container = _container((spec.get("template") or {}).get("spec") or {})
    base = Observation(
        Phase.PENDING,
        runner_name=meta.get("name"),
        image=container.get("image"),
        memory_limit=((container.get("resources") or {}).get("limits") or {}).get("memory"),
        deadline_seconds=spec.get("activeDeadlineSeconds"),
        since=parse_time(meta.get("creationTimestamp")),
    )
    if meta.get("deletionTimestamp"):
        return Observation(Phase.DELETED, runner_name=base.runner_name, deleted_kind="Job")
    conditions = _true_conditions(job)
    pod = current_pod(pods)
    if _SUCCESS & conditions.keys():
        return Observation(Phase.SUCCEEDED, runner_name=base.runner_name, exit_code=0)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed is not None:
        if failed.get("reason") == REASON_DEADLINE:
            return Observation(
                Phase.FAILED, runner_name=base.runner_name, reason=REASON_DEADLINE,
                deadline_seconds=base.deadline_seconds, message=failed.get("message"),
            )  # fmt: skip
        return _finished(base, pod, failed.get("reason"), failed.get("message"))
    if pod is None:
        return Observation(
            Phase.PENDING, runner_name=base.runner_name, since=base.since, image=base.image,
            waiting_reason="NoPodYet", message="the Job has not created a pod yet",
        )  # fmt: skip
    status = pod.get("status") or {}
    phase = status.get("phase")
    if phase == "Succeeded":
        return Observation(Phase.SUCCEEDED, runner_name=base.runner_name, exit_code=0)
    if _was_deleted(pod) and not _disrupted(pod):
        # Deleted while the Job still runs: by the Job controller itself (deadline) or by
        # someone else. The Job's verdict (DeadlineExceeded, PodFailurePolicy) tells which;
        # its update may arrive after the pod's on the other watch, so wait for it.
        return Observation(Phase.RUNNING, runner_name=base.runner_name, since=base.since)
    if phase == "Failed" and not _disrupted(pod):
        return _finished(base, pod, None, None)
    if phase == "Running":
        return Observation(
            Phase.RUNNING, runner_name=base.runner_name,
            since=parse_time(status.get("startTime")),
        )  # fmt: skip
    if _disrupted(pod):
        # Drained, evicted or preempted, and the Job's replacement pod not seen yet. The
        # pending clock starts at the disruption, not at this pod's creation (hours ago for
        # a long run: "still Pending after 7200 s" would delete a healthy Job).
        return Observation(
            Phase.PENDING, runner_name=base.runner_name, since=_disrupted_at(pod) or base.since,
            image=base.image, waiting_reason="AwaitingReplacement",
            message=f"pod {(pod.get('metadata') or {}).get('name')} was disrupted "
            f"({_true_conditions(pod)['DisruptionTarget'].get('reason') or 'no reason given'}); "
            "waiting for the Job to replace it",
        )  # fmt: skip
    # Pending: why is it not running?
    since = parse_time((pod.get("metadata") or {}).get("creationTimestamp")) or base.since
    waiting = (_container_status(pod).get("state") or {}).get("waiting") or {}
    reason, message = waiting.get("reason"), waiting.get("message")
    if not reason:
        scheduled = next(
            (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
        )
        if scheduled and scheduled.get("status") == "False":
            reason = scheduled.get("reason") or REASON_UNSCHEDULABLE
            message = scheduled.get("message")
    return Observation(
        Phase.PENDING, runner_name=base.runner_name, since=since, image=base.image,
        waiting_reason=reason, message=message,
    )  # fmt: skip


def succeeded(job: Obj) -> bool:
    """The Job says its work is done (SuccessCriteriaMet comes first, then Complete)."""
    return bool(_SUCCESS & _true_conditions(job).keys())


def is_finished(job: Obj) -> bool:
    """Complete or failed (including FailureTarget: its pods are being terminated)."""
    conditions = _true_conditions(job)
    return bool({"Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"} & set(conditions))


#: The labels the executor reads: a Job's fencing token and installation, a pod's Job (kube.py).
_JOB_LABELS = (LABEL_JOB_ID, LABEL_ATTEMPT, LABEL_MANAGED_BY, LABEL_INSTANCE)
_POD_LABELS = ("batch.kubernetes.io/job-name", "job-name")


def _pick(obj: Obj | None, keys: tuple[str, ...]) -> Obj:
    """Only `keys`, absent ones left out. The result's keys are this module's constants, not
    the strings each decoded object brings, so thousands of cached objects share them."""
    obj = obj or {}
    return {k: obj[k] for k in keys if obj.get(k) is not None}


def _trim_meta(meta: Obj, labels: tuple[str, ...]) -> Obj:
    trimmed = _pick(meta, ("name", "creationTimestamp", "deletionTimestamp"))
    trimmed["labels"] = _pick(meta.get("labels"), labels)
    return trimmed


_CONDITION_KEYS = ("type", "status", "reason", "message")
#: A disruption's time starts the wait for the replacement pod (observe_job).
_DISRUPTION_KEYS = (*_CONDITION_KEYS, "lastTransitionTime")


def _trim_conditions(status: Obj) -> list[Obj]:
    return [_pick(c, _DISRUPTION_KEYS if c.get("type") == "DisruptionTarget" else _CONDITION_KEYS)
            for c in status.get("conditions") or []]  # fmt: skip


def trim_job(job: Obj) -> Obj:
    """Keep what observe_job and the executor read: the cache holds thousands of Jobs (and
    as many pods), and the controller's memory is mostly this cache (RSS target 150 MB with
    2,000 Jobs: bench/controller.py)."""
    spec = job.get("spec") or {}
    pod_spec = (spec.get("template") or {}).get("spec") or {}
    status = job.get("status") or {}
    containers = []
    for c in pod_spec.get("containers") or []:
        limits = (c.get("resources") or {}).get("limits") or {}
        container = _pick(c, ("name", "image"))
        container["resources"] = {"limits": _pick(limits, ("memory",))}
        containers.append(container)
    meta = job.get("metadata") or {}
    return {
        # uid: the Events about a Job name it (controller/events.py), as `kubectl describe` asks.
        "metadata": {**_trim_meta(meta, _JOB_LABELS), **_pick(meta, ("uid",))},
        "spec": {
            "activeDeadlineSeconds": spec.get("activeDeadlineSeconds"),
            "template": {"spec": {"containers": containers}},
        },
        "status": {"conditions": _trim_conditions(status), "startTime": status.get("startTime")},
    }


def _trim_state(state: Obj | None) -> Obj:
    state = state or {}
    trimmed: Obj = {}
    if "waiting" in state:
        trimmed["waiting"] = _pick(state["waiting"], ("reason", "message"))
    if "running" in state:
        trimmed["running"] = _pick(state["running"], ("startedAt",))
    if "terminated" in state:
        trimmed["terminated"] = _pick(
            state["terminated"], ("exitCode", "reason", "message", "finishedAt")
        )
    return trimmed


def trim_pod(pod: Obj) -> Obj:
    status = pod.get("status") or {}
    return {
        "metadata": _trim_meta(pod.get("metadata") or {}, _POD_LABELS),
        "status": {
            "phase": status.get("phase"),
            # An eviction is told only here ("Evicted" and the kubelet's message).
            **_pick(status, ("reason", "message")),
            "conditions": _trim_conditions(status),
            "containerStatuses": [
                {"name": c.get("name"), "state": _trim_state(c.get("state"))}
                for c in status.get("containerStatuses") or []
            ],
            "startTime": status.get("startTime"),
        },
    }
