"""AlreadyExists at create: adopt the existing Job only when its labels say it is this
attempt's Job, made by this installation; and another installation's Jobs in the cache are
never observed, swept or deleted (issue 10, defect 1). No API server: the Batch API is a
stand-in."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller.jobspec import Instance, LaunchSpec, build_job, job_name
from controller.kube import JsonPosts, KubernetesExecutor
from controller.kubestate import foreign_labels
from controller.metrics import Metrics
from controller.model import NOT_FOUND, Phase, RunnerKey
from controller.settings import ControllerSettings

SETTINGS = ControllerSettings(DB_HOST="db", DB_USER="u", NAMESPACE="ns")
SPEC = LaunchSpec(7, 1, "00000000-0000-0000-0000-000000000001", None)
INSTANCE = Instance("prod", uuid.UUID("11111111-2222-4333-8444-555555555555"))
#: The same release name against another database (a restored or reinstalled one).
OLD_DATABASE = Instance("prod", uuid.UUID("99999999-2222-4333-8444-555555555555"))
#: Another release in the same namespace.
OTHER_RELEASE = Instance("staging", INSTANCE.installation_id)
OURS = build_job(SETTINGS, SPEC, INSTANCE)["metadata"]["labels"]
NAME = job_name(SETTINGS, INSTANCE, 7, 1)


def existing(**labels: str | None) -> dict[str, Any]:
    merged = {k: v for k, v in {**OURS, **labels}.items() if v is not None}
    return {"metadata": {"name": NAME, "labels": merged}, "status": {}}


KEY = RunnerKey(7, 1)


def running_job(instance: Instance, key: RunnerKey = KEY) -> dict[str, Any]:
    """Another installation's (or our) Job of `key`, started, as the cache holds it."""
    manifest = build_job(SETTINGS, LaunchSpec(key.job_id, key.attempt, SPEC.media_id, None),
                         instance)  # fmt: skip
    meta = {**manifest["metadata"], "creationTimestamp": "2026-01-01T00:00:00Z"}
    return {"metadata": meta, "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}


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
        (existing(**{"dharma.stream/instance": OLD_DATABASE.label}),
         f"dharma.stream/instance={OLD_DATABASE.label}"),
        (existing(**{"dharma.stream/instance": None}), "dharma.stream/instance=<unset>"),
    ],
    ids=["ours", "other attempt", "other job", "unmanaged", "two differ", "other database",
         "no instance (an older controller's)"],
)  # fmt: skip
def test_foreign_labels(job: dict[str, Any], expected: str | None) -> None:
    assert foreign_labels(job, RunnerKey(7, 1), INSTANCE.label) == expected


class FakeBatch:
    """A Job of this name exists (`found`): creating answers AlreadyExists, reading finds it."""

    def __init__(self, found: dict[str, Any]) -> None:
        self.found = found

    def post(self, *args: Any, **kwargs: Any) -> Any:
        raise ApiException(status=409, reason="Conflict")

    def read_namespaced_job(self, *args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(data=json.dumps(self.found).encode())


def executor(found: dict[str, Any]) -> KubernetesExecutor:
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube._batch = kube._posts = FakeBatch(found)  # type: ignore[assignment]
    return kube


def test_already_exists_with_our_labels_is_launched_before() -> None:
    (result,) = executor(existing()).launch([SPEC])
    assert (result.runner_name, result.error) == (NAME, None)


def test_already_exists_with_other_labels_fails_the_launch() -> None:
    (result,) = executor(existing(**{"dharma.stream/attempt": "3"})).launch([SPEC])
    assert result.runner_name is None and result.foreign
    assert result.error == (
        f"Job {NAME} already exists but is not this attempt's (dharma.stream/attempt=3)"
    )


@pytest.mark.parametrize("other", [OLD_DATABASE, OTHER_RELEASE], ids=["database", "release"])
def test_already_exists_of_another_installation_is_not_adopted(other: Instance) -> None:
    """A 409 whose Job carries another installation's label (same job id and attempt) fails
    the launch as foreign: its outcome must never be recorded as this attempt's."""
    (result,) = executor(existing(**{"dharma.stream/instance": other.label})).launch([SPEC])
    assert result.runner_name is None and result.foreign
    assert f"dharma.stream/instance={other.label}" in (result.error or "")


def test_job_names_differ_per_installation() -> None:
    names = {job_name(SETTINGS, i, 7, 1) for i in (INSTANCE, OLD_DATABASE, OTHER_RELEASE)}
    assert len(names) == 3 and all(n.startswith("dharma-stt-") for n in names)


@pytest.mark.parametrize("other", [OLD_DATABASE, OTHER_RELEASE], ids=["database", "release"])
def test_another_installations_job_is_never_ours(other: Instance) -> None:
    """Even if another installation's Job reaches the cache (under its own name, or a name
    equal to ours), it is not observed as this attempt's runner, not listed as alive (so
    the sweep never deletes it), and `delete` targets only our own name."""
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    theirs = running_job(other)
    kube.jobs.put(theirs)
    impostor = running_job(other)
    impostor["metadata"] = {**impostor["metadata"], "name": NAME}  # our name, their labels
    kube.jobs.put(impostor)
    assert kube.observe(RunnerKey(7, 1)) == NOT_FOUND
    assert kube.alive() == []
    kube.jobs.put(running_job(INSTANCE, RunnerKey(8, 2)))
    assert kube.alive() == [RunnerKey(8, 2)]
    deleted: list[str] = []
    kube._batch = SimpleNamespace(delete_namespaced_job=lambda name, *a, **k: deleted.append(name))
    kube.delete(RunnerKey(7, 1))
    assert deleted == [NAME] != [theirs["metadata"]["name"]]


def test_our_running_job_is_observed() -> None:
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube.jobs.put(running_job(INSTANCE))
    seen = kube.observe(RunnerKey(7, 1))
    assert seen.runner_name == NAME and seen.phase is not Phase.NONE


def test_watches_select_only_this_installation() -> None:
    """Both caches list and watch with the instance selector; unbound, nothing starts."""
    calls: list[str] = []

    def list_fn(namespace: str, **kwargs: Any) -> Any:
        calls.append(kwargs["label_selector"])
        raise ApiException(status=500, reason="stop here")

    kube = KubernetesExecutor(SETTINGS, client.ApiClient())
    with pytest.raises(RuntimeError, match="bind"):
        kube.start(lambda: None)
    kube.bind(INSTANCE)
    for informer in (kube.jobs, kube.pods):
        informer._list = list_fn
        with pytest.raises(ApiException):
            informer._relist()
    assert calls == [INSTANCE.selector, INSTANCE.selector]
    assert "dharma.stream/instance=prod-11111111" in INSTANCE.selector


def test_a_failed_launch_is_observed_until_it_succeeds_or_is_forgotten() -> None:
    """Launch-error memory lives in the executor (issue 11): `observe` reports a failed
    launch as Phase.NONE with the first failure's time, the error and its verdict."""
    kube = executor(existing(**{"dharma.stream/attempt": "3"}))
    kube.launch([SPEC])
    first = kube.observe(KEY)
    assert (first.phase, first.reason) == (Phase.NONE, "Foreign")
    assert first.since is not None and "already exists" in (first.message or "")
    kube.launch([SPEC])
    assert kube.observe(KEY).since == first.since  # the pending timeout counts from the first
    kube.forget(KEY)
    assert kube.observe(KEY) == NOT_FOUND
    kube.launch([SPEC])
    # The conflicting Job is gone; ours is found.
    kube._batch = kube._posts = FakeBatch(existing())  # type: ignore[assignment]
    (result,) = kube.launch([SPEC])
    assert result.runner_name == NAME
    assert kube._launch_errors.get(KEY) is None
    assert kube.abandoned_after is None and kube.shutdown() == []


def test_alive_counts_the_runners_still_pending() -> None:
    """dharma_runners_pending and dharma_runner_oldest_pending_age_seconds (issue 13: the
    "runners stuck pending" alert) come from the walk over every runner: a Job with no pod
    yet waits since its creation, a running pod does not count."""
    metrics = Metrics()
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), metrics=metrics, instance=INSTANCE)
    kube.jobs.put(running_job(INSTANCE))  # no pod yet: pending since 2026-01-01
    running = running_job(INSTANCE, RunnerKey(8, 2))
    kube.jobs.put(running)
    kube.pods.put(
        {
            "metadata": {
                "name": "p",
                "namespace": "ns",
                "labels": {"job-name": running["metadata"]["name"]},
                "creationTimestamp": "2026-01-01T00:00:00Z",
            },
            "status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z"},
        }
    )
    assert sorted(kube.alive()) == [RunnerKey(7, 1), RunnerKey(8, 2)]
    registry = metrics.registry
    assert registry.get_sample_value("dharma_runners_pending") == 1
    age = registry.get_sample_value("dharma_runner_oldest_pending_age_seconds")
    assert age is not None and age > 24 * 3600
    gone = running_job(INSTANCE)
    gone["metadata"]["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    kube.jobs.put(gone)
    assert kube.alive() == [RunnerKey(8, 2)]
    assert registry.get_sample_value("dharma_runners_pending") == 0
    assert registry.get_sample_value("dharma_runner_oldest_pending_age_seconds") == 0


def test_a_job_naming_an_unknown_model_is_an_invalid_launch_without_a_request() -> None:
    """No Job is sent for a model the catalog lacks: the launch is invalid (not retried) and
    says which model and which are known; reconcile.decide then fails the row."""

    class NoCreate:
        def post(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a Job was created")

    executor = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    executor._posts = NoCreate()  # type: ignore[assignment]
    spec = LaunchSpec(7, 1, SPEC.media_id, None, "large")
    [result] = executor.launch([spec])
    assert (result.runner_name, result.invalid) == (None, True)
    assert result.error == (
        "model 'large' is not in the model catalog (WHISPER_MODELS); known models: base"
    )
    assert executor.observe(KEY).reason == "Invalid"


def test_observations_are_derived_again_only_when_the_job_or_a_pod_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pass looks at every cached Job (alive) and every row's Job (observe); what they
    derive is kept while the cache holds the same objects (issue 11, steady-state CPU), and
    a new Job or pod object — every watch event makes one — is looked at afresh."""
    import controller.kube as kube_module

    calls: list[str] = []
    from controller.kubestate import observe_job as real

    def counting(job: dict[str, Any], pods: list[dict[str, Any]]) -> Any:
        calls.append(job["metadata"]["name"])
        return real(job, pods)

    monkeypatch.setattr(kube_module, "observe_job", counting)
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube.jobs.put(running_job(INSTANCE))
    pod = {
        "metadata": {"name": "p", "namespace": "ns", "labels": {"job-name": NAME}},
        "status": {"phase": "Pending"},
    }
    kube.pods.put(pod)
    assert kube.observe(KEY).phase is Phase.PENDING
    assert kube.alive() == [KEY]
    assert kube.observe(KEY).phase is Phase.PENDING
    assert calls == [NAME]  # once for three looks
    kube.pods.put({**pod, "status": {"phase": "Running", "startTime": "2026-01-01T00:00:01Z"}})
    assert kube.observe(KEY).phase is Phase.RUNNING
    assert kube.alive() == [KEY]
    assert calls == [NAME, NAME]
    done = running_job(INSTANCE)
    done["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    kube.jobs.put(done)
    assert kube.alive() == []  # finished: not even observed
    assert kube.observe(KEY).phase is Phase.SUCCEEDED
    assert calls == [NAME, NAME, NAME]


RUNNING_POD = {
    "metadata": {"name": "p", "namespace": "ns", "labels": {"job-name": NAME}},
    "status": {"phase": "Running", "startTime": "2026-01-01T00:00:01Z"},
}


def test_a_pod_leaving_the_watch_on_success_waits_for_the_jobs_verdict() -> None:
    """The pod watch leaves out Succeeded pods (POD_FIELD_SELECTOR), so the API server
    reports a pod's success as its DELETED event, carrying the pod's last running state: the
    attempt stays running until the Job's own condition says how it ended. The pod's
    tombstone goes when the Job succeeds (its verdict is read before any pod, and the pod's
    later events never come), and no tombstone is made once it has."""
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube.jobs.put(running_job(INSTANCE))
    kube.pods.put(RUNNING_POD)
    kube.pods._remove(RUNNING_POD)
    assert kube.pods.get("p") is not None
    assert kube.observe(KEY).phase is Phase.RUNNING
    done = running_job(INSTANCE)
    done["status"] = {"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]}
    kube.jobs.put(done)
    assert kube.observe(KEY).phase is Phase.SUCCEEDED
    assert kube.pods.get("p") is None
    kube.pods.put(RUNNING_POD)  # the pod's watch behind the Job's
    kube.pods._remove(RUNNING_POD)
    assert kube.pods.get("p") is None


def test_a_failed_jobs_deleted_pod_is_remembered_until_the_job_goes() -> None:
    """A pod deleted under a Job that then fails is how the failure is told ("pod of Job …
    was deleted externally"): its tombstone stays while the Job does."""
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube.jobs.put(running_job(INSTANCE))
    kube.pods.put(RUNNING_POD)
    kube.pods._remove(RUNNING_POD)
    failed = running_job(INSTANCE)
    failed["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
    }
    kube.jobs.put(failed)
    assert kube.observe(KEY).phase is Phase.DELETED
    kube.jobs._remove(failed)
    assert kube.pods.get("p") is None


def test_json_posts_send_the_body_reuse_one_connection_and_raise_api_errors() -> None:
    """JsonPosts against a real HTTP server on loopback (the API server's TLS is not what is
    tested here): the dict arrives as JSON at the namespaced path, one connection serves
    every post (each answer is read in full, so its connection goes back to the pool), and
    a 409 raises the ApiException the generated client raises."""
    import http.server
    import threading

    seen: list[tuple[str, dict[str, Any], int]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the API server

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.client_address[1]))
            status = 409 if body["metadata"]["name"] == "taken" else 201
            answer = json.dumps({"kind": "Job", **body}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_port}")
        posts = JsonPosts(client.ApiClient(configuration))
        path = "/apis/batch/v1/namespaces/{namespace}/jobs"
        for n in range(3):
            created = posts.post(path, "ns", {"metadata": {"name": f"j{n}"}}, 5.0)
            assert created == {"kind": "Job", "metadata": {"name": f"j{n}"}}
        with pytest.raises(ApiException) as caught:
            posts.post(path, "ns", {"metadata": {"name": "taken"}}, 5.0)
        assert caught.value.status == 409
    finally:
        server.shutdown()
        server.server_close()
    assert [p for p, _, _ in seen] == ["/apis/batch/v1/namespaces/ns/jobs"] * 4
    assert len({port for _, _, port in seen}) == 1, "every post on one connection"


@pytest.mark.parametrize(
    ("answer", "asked"),
    [(None, True), (ApiException(status=404, reason="Not Found"), True),
     (ApiException(status=500, reason="Internal Server Error"), False),
     (ConnectionError("connection refused"), False)],
    ids=["deleted", "already gone", "refused", "unreachable"],
)  # fmt: skip
def test_delete_says_whether_the_stop_was_asked_for(answer: Exception | None, asked: bool) -> None:
    """The loop remembers a stop it asked for and leaves the runner to stop while the cache
    still shows it (test_service_pass.py); a refused or unsent delete is asked again."""

    class Batch:
        def delete_namespaced_job(self, *args: Any, **kwargs: Any) -> None:
            if answer is not None:
                raise answer

    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), instance=INSTANCE)
    kube._batch = Batch()
    assert kube.delete(KEY) is asked
