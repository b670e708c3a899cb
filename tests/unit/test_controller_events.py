"""Kubernetes Events on runner Jobs (controller/events.py): the Event's shape and its limits,
and a recorder that never blocks or fails the loop (a full queue, a refusal and an error are
dropped and counted). The Kubernetes executor's `record_event` with an Events API stand-in.
Which Events a pass records: tests/unit/test_service_pass.py; on a real API server:
tests/e2e/test_controller_events.py."""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
import time
import uuid
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller import kube as kube_module
from controller.events import (
    NOTE_LIMIT_BYTES,
    REPORTING_CONTROLLER,
    EventRecorder,
    build_event,
    truncate_utf8,
)
from controller.executor import EventReason
from controller.jobspec import Instance, LaunchSpec, build_job, job_name
from controller.kube import KubernetesExecutor
from controller.local import LocalExecutor
from controller.metrics import Metrics
from controller.model import RunnerKey
from controller.settings import ControllerSettings
from controller.threads import TokenBucket

INSTANCE = Instance("prod", uuid.UUID("11111111-2222-4333-8444-555555555555"))
KEY = RunnerKey(42, 2)
NOW = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=dt.timezone.utc)
SETTINGS = ControllerSettings(DB_HOST="db", DB_USER="u", NAMESPACE="ns", POD_NAME="ctl-0")


def event(reason: EventReason = EventReason.RETRYING, message: str = "m", **kw: Any) -> Any:
    args: dict[str, Any] = dict(
        namespace="ns", job_name="dharma-stt-abc-42-2", job_uid="uid-1", key=KEY,
        instance=INSTANCE, reporting_instance="ctl-0", reason=reason, message=message, now=NOW,
    )  # fmt: skip
    return build_event(**{**args, **kw})


def sample(metrics: Metrics, why: str) -> float | None:
    return metrics.registry.get_sample_value("dharma_events_dropped_total", {"why": why})


def test_an_event_regards_the_attempts_job() -> None:
    body = event(message="runner_error_temporary: WebDAV 503 (attempt 2 of 3; retrying in 5 s)")
    name = body["metadata"].pop("name")
    assert re.fullmatch(r"dharma-stt-abc-42-2\.[0-9a-f]+", name)
    assert body == {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {
            "namespace": "ns",
            "labels": {"dharma.stream/instance": INSTANCE.label, "dharma.stream/job-id": "42",
                       "dharma.stream/attempt": "2"},
        },
        "eventTime": "2026-03-04T05:06:07.890123Z",
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": "ctl-0",
        "action": "Retry",
        "reason": "Retrying",
        "type": "Warning",
        "note": "runner_error_temporary: WebDAV 503 (attempt 2 of 3; retrying in 5 s)",
        "regarding": {"apiVersion": "batch/v1", "kind": "Job", "namespace": "ns",
                      "name": "dharma-stt-abc-42-2", "uid": "uid-1"},
    }  # fmt: skip


def test_two_events_of_one_moment_have_two_names() -> None:
    assert event()["metadata"]["name"] != event()["metadata"]["name"]


@pytest.mark.parametrize(
    ("reason", "kind", "action"),
    [(EventReason.CLAIMED, "Normal", "Launch"), (EventReason.RETRYING, "Warning", "Retry"),
     (EventReason.FAILED, "Warning", "Fail"), (EventReason.CANCELLED, "Normal", "Cancel"),
     (EventReason.SUCCEEDED, "Normal", "Complete")],
)  # fmt: skip
def test_type_and_action_follow_the_reason(reason: EventReason, kind: str, action: str) -> None:
    body = event(reason)
    assert (body["reason"], body["type"], body["action"]) == (reason.value, kind, action)
    assert re.fullmatch(r"[A-Z][A-Za-z]+", body["reason"])  # CamelCase, as Kubernetes' own


def test_without_a_known_job_the_event_regards_its_name_only() -> None:
    """The launch failed (no Job), or the Job is gone from the cache: no uid."""
    regarding = event(job_uid=None)["regarding"]
    assert regarding == {"apiVersion": "batch/v1", "kind": "Job", "namespace": "ns",
                         "name": "dharma-stt-abc-42-2"}  # fmt: skip


def test_the_note_is_cut_to_the_api_servers_limit() -> None:
    """Messages quote runners and errors: a long one is cut (in bytes, never inside a
    character) instead of making the API server refuse the Event."""
    note = event(message="é" * 5000)["note"]
    assert len(note.encode()) <= NOTE_LIMIT_BYTES and note.endswith("…")
    assert note.rstrip("…") == "é" * len(note.rstrip("…"))
    assert event(message="x" * NOTE_LIMIT_BYTES)["note"] == "x" * NOTE_LIMIT_BYTES
    assert truncate_utf8("short", 10) == "short"
    assert truncate_utf8("abcdefghijkl", 10) == "abcdefg…"
    assert event(reporting_instance="p" * 300)["reportingInstance"] == "p" * 128


def test_event_time_has_microseconds_in_utc() -> None:
    later = dt.datetime(2026, 3, 4, 7, 6, 7, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert event(now=later)["eventTime"] == "2026-03-04T05:06:07.000000Z"


# ------------------------------------------------------------------ the recorder ---


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    """The worker is stuck on a slow API: the loop's `record` still returns at once; what
    does not fit is dropped and counted; the rest is posted once the API answers."""
    metrics = Metrics()
    release = threading.Event()
    posted: list[str] = []

    def slow_post(body: dict[str, Any]) -> None:
        release.wait(10)
        posted.append(body["reason"])

    recorder = EventRecorder(slow_post, metrics, capacity=2)
    recorder.start()
    try:
        recorder.record({"reason": "First"})
        deadline = time.monotonic() + 5
        while recorder._queue.qsize():  # the worker took it and is stuck posting it
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        for number in range(10):
            recorder.record({"reason": f"E{number}"})
        assert time.monotonic() - started < 0.5
        assert recorder.dropped == 8 and sample(metrics, "queue_full") == 8
    finally:
        release.set()
        recorder.stop(timeout=5)
    assert posted == ["First", "E0", "E1"]


def test_a_refusal_or_an_error_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    """The API refuses (4xx), fails (5xx) or cannot be reached: dropped, counted, and one
    warning a minute, not one per Event."""
    metrics = Metrics()
    answers = [
        ApiException(status=422, reason="Unprocessable Entity"),
        OSError("connection refused"),
        ApiException(status=500, reason="Internal"),
    ]

    def post(body: dict[str, Any]) -> None:
        raise answers.pop(0)

    recorder = EventRecorder(post, metrics)
    with caplog.at_level(logging.WARNING, logger="controller.events"):
        for _ in range(3):
            recorder.record({"reason": "Failed", "regarding": {"name": "dharma-stt-x-1-1"}})
        recorder.start()
        recorder.stop(timeout=5)
    assert not answers and recorder.dropped == 3
    assert (sample(metrics, "refused"), sample(metrics, "error")) == (1, 2)
    (record,) = [r for r in caplog.records if getattr(r, "action", None) == "event_dropped"]
    assert (record.why, record.error, record.runner_name) == (  # type: ignore[attr-defined]
        "refused", "422 Unprocessable Entity", "dharma-stt-x-1-1")  # fmt: skip


def test_a_role_without_events_is_not_asked_again_for_a_while() -> None:
    """403 (rbac.events=false): the next Events are dropped without a request each."""
    metrics = Metrics()
    asked: list[str] = []

    def post(body: dict[str, Any]) -> None:
        asked.append(body["reason"])
        raise ApiException(status=403, reason="Forbidden")

    recorder = EventRecorder(post, metrics)
    recorder.start()
    try:
        recorder.record({"reason": "Claimed"})
        deadline = time.monotonic() + 5
        while not recorder.dropped:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(5):
            recorder.record({"reason": "Failed"})
    finally:
        recorder.stop(timeout=5)
    assert asked == ["Claimed"]
    assert recorder.dropped == 6 and sample(metrics, "refused") == 6


def test_stop_without_start_returns_at_once() -> None:
    recorder = EventRecorder(lambda body: None)
    recorder.record({"reason": "Claimed"})
    started = time.monotonic()
    recorder.stop(timeout=5)
    assert time.monotonic() - started < 0.5


# ------------------------------------------------------------------ the executors ---


class FakeEvents:
    """The executor's JSON poster (controller/kube.py JsonPosts), recording Events."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []
        self.done = threading.Event()

    def post(self, path: str, namespace: str, body: dict[str, Any], timeout: float) -> Any:
        assert path == "/apis/events.k8s.io/v1/namespaces/{namespace}/events"
        self.created.append((namespace, body))
        self.done.set()
        return body


def kube_executor() -> tuple[KubernetesExecutor, FakeEvents]:
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), Metrics(), instance=INSTANCE)
    events = FakeEvents()
    kube._posts = events  # type: ignore[assignment]
    kube._events.start()
    return kube, events


def posted(kube: KubernetesExecutor, events: FakeEvents) -> dict[str, Any]:
    assert events.done.wait(5)
    kube._events.stop(timeout=5)
    ((namespace, body),) = events.created
    assert namespace == "ns"
    return body


def test_the_kubernetes_executor_posts_on_the_cached_jobs_uid() -> None:
    kube, events = kube_executor()
    job = build_job(SETTINGS, LaunchSpec(KEY.job_id, KEY.attempt, str(uuid.uuid4()), None),
                    INSTANCE)  # fmt: skip
    job["metadata"]["uid"] = "0f6c-uid"
    kube.jobs.put(job)
    kube.record_event(KEY, EventReason.CLAIMED, "claimed: attempt 2 of 3, memory limit 2Gi")
    body = posted(kube, events)
    name = job_name(SETTINGS, INSTANCE, KEY.job_id, KEY.attempt)
    assert body["regarding"] == {"apiVersion": "batch/v1", "kind": "Job", "namespace": "ns",
                                 "name": name, "uid": "0f6c-uid"}  # fmt: skip
    assert (body["reason"], body["reportingInstance"]) == ("Claimed", "ctl-0")


def test_the_kubernetes_executor_posts_on_the_name_of_a_job_never_created() -> None:
    kube, events = kube_executor()
    kube.record_event(KEY, EventReason.FAILED, "launch_failed: the runner could not be created")
    body = posted(kube, events)
    assert body["regarding"]["name"] == job_name(SETTINGS, INSTANCE, KEY.job_id, KEY.attempt)
    assert "uid" not in body["regarding"] and body["type"] == "Warning"


def test_a_bug_building_the_event_does_not_reach_the_loop() -> None:
    kube = KubernetesExecutor(SETTINGS, client.ApiClient(), Metrics())  # never bound
    kube.record_event(KEY, EventReason.CLAIMED, "claimed")
    assert kube._events.dropped == 1


def test_the_local_executor_records_no_events(tmp_path: Any) -> None:
    """A no-op (its log lines tell the story): nothing started, nothing written."""
    local = LocalExecutor(SETTINGS.model_copy(update={"LOCAL_SCRATCH_DIR": tmp_path}))
    local.record_event(KEY, EventReason.FAILED, "bad media")
    assert list(tmp_path.iterdir()) == []


def test_normal_events_are_rate_limited_and_warnings_never() -> None:
    """A backfill at 20 Jobs/s made two Normal Events per Job: more than the one posting
    thread could send (most were dropped as queue_full, after costing CPU and API time).
    Normal Events now pass a token bucket (burst, then a steady rate); Warnings — the ones
    a person debugging a job needs — always go through."""
    now = [0.0]
    metrics = Metrics()
    bucket = TokenBucket(rate=5.0, burst=25, clock=lambda: now[0])
    recorder = EventRecorder(lambda body: None, metrics, capacity=1000, normal=bucket)
    for _ in range(30):
        recorder.record({"reason": "Claimed", "type": "Normal"})
    assert recorder._queue.qsize() == 25 and sample(metrics, "rate_limited") == 5
    for _ in range(10):
        recorder.record({"reason": "Failed", "type": "Warning"})
    assert recorder._queue.qsize() == 35
    now[0] = 1.0  # one second later: five more
    for _ in range(10):
        recorder.record({"reason": "Claimed", "type": "Normal"})
    assert recorder._queue.qsize() == 40 and sample(metrics, "rate_limited") == 10


def test_an_event_over_the_rate_limit_is_never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 20 Jobs/s most Normal Events are over the limit: the executor asks the recorder
    first and builds (cache lookup, names, times) only the ones it will post."""
    kube, events = kube_executor()
    kube._events._normal = TokenBucket(rate=0.0, burst=1, clock=lambda: 0.0)
    built: list[str] = []
    real_build = build_event

    def counted(**kwargs: Any) -> dict[str, Any]:
        built.append(kwargs["reason"].value)
        return real_build(**kwargs)

    monkeypatch.setattr(kube_module, "build_event", counted)
    kube.record_event(KEY, EventReason.CLAIMED, "claimed")  # the one token
    kube.record_event(KEY, EventReason.SUCCEEDED, "succeeded")  # over the limit
    kube.record_event(KEY, EventReason.FAILED, "failed")  # a Warning: never limited
    assert built == ["Claimed", "Failed"] and kube._events.dropped == 1
    kube._events.stop(timeout=5)
    assert [body["reason"] for _, body in events.created] == ["Claimed", "Failed"]
