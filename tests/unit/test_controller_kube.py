"""AlreadyExists at create: adopt the existing Job only when its labels say it is this
attempt's Job, made by this controller. No API server: the Batch API is a stand-in."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.jobspec import LaunchSpec, build_job
from controller.kube import KubernetesExecutor
from controller.kubestate import foreign_labels
from controller.model import RunnerKey
from controller.settings import ControllerSettings

SETTINGS = ControllerSettings(DB_HOST="db", DB_USER="u", NAMESPACE="ns")
SPEC = LaunchSpec(7, 1, "00000000-0000-0000-0000-000000000001", None)
OURS = build_job(SETTINGS, SPEC)["metadata"]["labels"]


def existing(**labels: str | None) -> dict[str, Any]:
    merged = {k: v for k, v in {**OURS, **labels}.items() if v is not None}
    return {"metadata": {"name": "dharma-stt-7-1", "labels": merged}, "status": {}}


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (existing(), None),
        (existing(**{"dharma.stream/attempt": "3"}), "dharma.stream/attempt=3"),
        (existing(**{"dharma.stream/job-id": "8"}), "dharma.stream/job-id=8"),
        (existing(**{"app.kubernetes.io/managed-by": None}),
         "app.kubernetes.io/managed-by=<unset>"),
        (existing(**{"app.kubernetes.io/managed-by": "helm", "dharma.stream/attempt": "2"}),
         "dharma.stream/attempt=2, app.kubernetes.io/managed-by=helm"),
    ],
    ids=["ours", "other attempt", "other job", "unmanaged", "two differ"],
)  # fmt: skip
def test_foreign_labels(job: dict[str, Any], expected: str | None) -> None:
    assert foreign_labels(job, RunnerKey(7, 1)) == expected


class FakeBatch:
    def __init__(self, found: dict[str, Any]) -> None:
        self.found = found

    def create_namespaced_job(self, *args: Any, **kwargs: Any) -> Any:
        raise ApiException(status=409, reason="Conflict")

    def read_namespaced_job(self, *args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(data=json.dumps(self.found).encode())


def executor(found: dict[str, Any]) -> KubernetesExecutor:
    kube = KubernetesExecutor(SETTINGS, client.ApiClient())
    kube._batch = FakeBatch(found)
    return kube


def test_already_exists_with_our_labels_is_launched_before() -> None:
    (result,) = executor(existing()).launch([SPEC])
    assert (result.runner_name, result.error) == ("dharma-stt-7-1", None)


def test_already_exists_with_other_labels_fails_the_launch() -> None:
    (result,) = executor(existing(**{"dharma.stream/attempt": "3"})).launch([SPEC])
    assert result.runner_name is None and result.foreign
    assert result.error == (
        "Job dharma-stt-7-1 already exists but is not this attempt's (dharma.stream/attempt=3)"
    )
