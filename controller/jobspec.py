"""The batch/v1 Job of one attempt (DESIGN.md "Kubernetes Job contract"), as a pure function.

`build_job(settings, LaunchSpec(...))` returns the manifest as a plain dict — exactly what is
sent to the API server — so it can be unit-tested, checked against the `restricted` Pod
Security Standard, and rendered by the Helm chart's tests without a cluster.

Choices that matter:

- The name `<JOB_NAME_PREFIX>-<job id>-<attempt>` is deterministic: creating it twice yields
  AlreadyExists, which the controller reads as "already launched". That makes a launch after
  a crash (claimed, then killed before or after the create) exactly-once.
- `backoffLimit: 0`: retries belong to the controller, which classifies each failure; every
  attempt keeps its own Job and logs. The podFailurePolicy ignores disruptions (preemption,
  eviction, node drain: the Job makes a new pod, not counted) and fails the Job on any exit
  code at once. `podReplacementPolicy: Failed` keeps a replacement pod from overlapping the
  old one.
- Configuration comes from a ConfigMap and a Secret by reference (`envFrom`), so no secret
  value is ever in the Job, in etcd's copy of it, or in `kubectl get job -o yaml`.
- The pod passes the `restricted` Pod Security Standard: non-root (uid 10001), read-only
  root filesystem, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp,
  no service-account token; scratch space is a size-limited emptyDir at /scratch, and the
  container requests that much ephemeral storage so it is scheduled where the disk is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from controller.quantity import format_bytes, parse_bytes
from controller.settings import ControllerSettings
from dharma_common.contract import (
    APP_NAME,
    DEFAULT_TERMINATION_MESSAGE_PATH,
    LABEL_APP,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_JOB_ID,
    LABEL_MANAGED_BY,
    LABEL_MEDIA_ID,
    MANAGED_BY,
    RUNNER_COMPONENT,
)

CONTAINER_NAME = "runner"
SCRATCH_VOLUME = "scratch"
SCRATCH_MOUNT = "/scratch"
RUNNER_UID = 10001
#: Ephemeral storage the runner may use beyond its scratch emptyDir: the pod's limit also
#: counts the container's log files (and any writable layer), and a limit equal to the
#: sizeLimit would evict a runner whose scratch is still within bounds.
EPHEMERAL_HEADROOM = "1Gi"
#: Selects every Job and pod this controller made (its watches use it).
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"


@dataclass(frozen=True)
class LaunchSpec:
    """What differs between attempts: the fencing token, the media, the memory limit."""

    job_id: int
    attempt: int
    media_id: str
    #: The row's `memory_limit` (raised after an OOM kill); None means RUNNER_MEMORY_LIMIT.
    memory_limit: str | None


def job_name(settings: ControllerSettings, job_id: int, attempt: int) -> str:
    """`<prefix>-<job id>-<attempt>`: the same attempt always gets the same name."""
    return f"{settings.JOB_NAME_PREFIX}-{job_id}-{attempt}"


def runner_labels(job: LaunchSpec) -> dict[str, str]:
    """Labels on the Job and its pods (`kubectl logs -l dharma.stream/media-id=<id>`)."""
    return {
        LABEL_APP: APP_NAME,
        LABEL_COMPONENT: RUNNER_COMPONENT,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_JOB_ID: str(job.job_id),
        LABEL_ATTEMPT: str(job.attempt),
        LABEL_MEDIA_ID: job.media_id,
    }


def runner_command(job_id: int, attempt: int) -> list[str]:
    return ["dharma-jobrunner", "run", "--job-id", str(job_id), "--attempt", str(attempt)]


def _resources(settings: ControllerSettings, memory_limit: str | None) -> dict[str, Any]:
    limit = memory_limit or settings.RUNNER_MEMORY_LIMIT
    request = settings.RUNNER_MEMORY_REQUEST
    if parse_bytes(request) > parse_bytes(limit):
        request = limit
    # Requesting the scratch size makes the scheduler place the runner on a node with that
    # much disk free, instead of an eviction (exit 137, no message) half-way through.
    scratch = settings.RUNNER_SCRATCH_SIZE
    scratch_limit = format_bytes(parse_bytes(scratch) + parse_bytes(EPHEMERAL_HEADROOM))
    return {
        "requests": {
            "cpu": settings.RUNNER_CPU_REQUEST,
            "memory": request,
            "ephemeral-storage": scratch,
        },
        "limits": {
            "cpu": settings.RUNNER_CPU_LIMIT,
            "memory": limit,
            "ephemeral-storage": scratch_limit,
        },
    }


def _security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUNNER_UID,
        "runAsGroup": RUNNER_UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container(settings: ControllerSettings, job: LaunchSpec) -> dict[str, Any]:
    return {
        "name": CONTAINER_NAME,
        "image": settings.RUNNER_IMAGE,
        "imagePullPolicy": settings.RUNNER_IMAGE_PULL_POLICY,
        "command": runner_command(job.job_id, job.attempt),
        "envFrom": [
            {"configMapRef": {"name": settings.RUNNER_CONFIGMAP_NAME}},
            {"secretRef": {"name": settings.RUNNER_SECRET_NAME}},
        ],
        "env": [
            {"name": "SCRATCH_DIR", "value": SCRATCH_MOUNT},
            # Libraries that ignore SCRATCH_DIR must not try the read-only root either.
            {"name": "TMPDIR", "value": SCRATCH_MOUNT},
            {"name": "HOME", "value": SCRATCH_MOUNT},
        ],
        "resources": _resources(settings, job.memory_limit),
        "volumeMounts": [{"name": SCRATCH_VOLUME, "mountPath": SCRATCH_MOUNT}],
        "securityContext": _security_context(),
        "terminationMessagePath": DEFAULT_TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
    }


def _pod_spec(settings: ControllerSettings, job: LaunchSpec) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(settings, job)],
        "volumes": [
            {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": settings.RUNNER_SCRATCH_SIZE}}
        ],
    }
    if settings.RUNNER_SERVICE_ACCOUNT:
        spec["serviceAccountName"] = settings.RUNNER_SERVICE_ACCOUNT
    if settings.RUNNER_PRIORITY_CLASS:
        spec["priorityClassName"] = settings.RUNNER_PRIORITY_CLASS
    if settings.RUNNER_NODE_SELECTOR:
        spec["nodeSelector"] = dict(settings.RUNNER_NODE_SELECTOR)
    if settings.RUNNER_TOLERATIONS:
        spec["tolerations"] = [dict(t) for t in settings.RUNNER_TOLERATIONS]
    if settings.RUNNER_AFFINITY:
        spec["affinity"] = dict(settings.RUNNER_AFFINITY)
    secrets = [name.strip() for name in settings.RUNNER_IMAGE_PULL_SECRETS.split(",")]
    if any(secrets):
        spec["imagePullSecrets"] = [{"name": name} for name in secrets if name]
    return spec


def build_job(settings: ControllerSettings, job: LaunchSpec) -> dict[str, Any]:
    """The complete batch/v1 Job manifest for one attempt."""
    labels = runner_labels(job)
    # Operator-supplied pod labels never replace ours (watches and `kubectl logs -l` rely
    # on them).
    pod_labels = {**settings.RUNNER_POD_LABELS, **labels}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(settings, job.job_id, job.attempt),
            "namespace": settings.NAMESPACE,
            "labels": labels,
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": settings.JOB_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": settings.JOB_TTL_SECONDS,
            "podReplacementPolicy": "Failed",
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER_NAME,
                            "operator": "NotIn",
                            "values": [0],
                        },
                    },
                ]
            },
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": dict(settings.RUNNER_POD_ANNOTATIONS),
                },
                "spec": _pod_spec(settings, job),
            },
        },
    }
