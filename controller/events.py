"""Kubernetes Events on runner Jobs: the loop's decisions about an attempt (claimed, retrying,
failed, cancelled, succeeded), so `kubectl describe job/<runner_name>` tells its story.

`build_event` makes one events.k8s.io/v1 Event: `regarding` the attempt's Job (by name, and
by uid when the watch cache has the Job: `kubectl describe` matches Events on the uid), the
reason CamelCase (`EventReason`), a note of at most 1 KiB (notes quote runners' termination
messages and error texts, so they are cut, never rejected by the API server), labelled with
the job id, attempt and instance so `kubectl get events -l dharma.stream/job-id=42` finds a
job's Events across attempts. An attempt whose Job was never created (its launch failed) gets
its Events anyway, regarding the name its Job would have had, without a uid: `kubectl get
events --field-selector involvedObject.name=<name>` shows them, and the row says the same.

`EventRecorder` posts them off the loop's thread: a bounded queue and one worker thread (one:
Events share the controller's API priority-and-fairness flow with its Job creates, and must not
crowd them out). Normal Events are rate-limited (NORMAL_EVENTS_PER_SECOND), Warnings never.
A full queue, a refusal or any other error drops the Event, counts it
(`dharma_events_dropped_total{why}`) and logs at most one warning a minute: Events are for
people, the row and the logs are the record, and the loop never waits for them or fails
because of them. After a 403 (the Role lacks `create events`: chart value `rbac.events`) no
Event is sent for FORBIDDEN_PAUSE_SECONDS, so a Role without them costs one refused request
every few minutes, not two or three per attempt.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException

from controller.executor import EventReason
from controller.jobspec import Instance
from controller.metrics import Metrics
from controller.model import RunnerKey
from controller.threads import TokenBucket
from dharma_common.contract import LABEL_ATTEMPT, LABEL_INSTANCE, LABEL_JOB_ID
from dharma_common.errors import first_line

log = logging.getLogger(__name__)
Obj = dict[str, Any]

#: The Events' `reportingController`.
REPORTING_CONTROLLER = "dharma.stream/controller"
#: The API server's limit on an Event's note, in bytes (events.k8s.io/v1 validation).
NOTE_LIMIT_BYTES = 1024
#: The API server's limit on `reportingInstance`, `action` and `reason`.
FIELD_LIMIT = 128
#: Events waiting to be posted; more are dropped.
QUEUE_CAPACITY = 256
#: At most one warning about dropped Events per this many seconds.
DROP_LOG_INTERVAL_SECONDS = 60.0
#: After a 403, Events are dropped without asking the API for this many seconds.
FORBIDDEN_PAUSE_SECONDS = 300.0
#: Normal Events (Claimed, Cancelled, Succeeded) are posted at most this many per second on
#: average, in bursts of up to NORMAL_BURST; beyond, they are dropped (`rate_limited`).
#: Warnings (Retrying, Failed) are never limited. Why: at 20 Jobs/s (a backfill, the soak of
#: bench/load.py) two Normal Events per Job overran the one posting thread (~2,900 of 4,800
#: dropped as queue_full), cost more CPU than the rest of the loop, and competed with Job
#: creates for the API server; a talk per minute, the real workload, never reaches the limit.
NORMAL_EVENTS_PER_SECOND = 5.0
NORMAL_BURST = 25

_ELLIPSIS = "…"
_SEQUENCE = itertools.count()


def truncate_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (never inside a character), ending with
    an ellipsis when it was cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    room = limit - len(_ELLIPSIS.encode())
    return data[:room].decode(errors="ignore") + _ELLIPSIS


def micro_time(moment: dt.datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 in UTC with microseconds."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_event(
    *,
    namespace: str,
    job_name: str,
    job_uid: str | None,
    key: RunnerKey,
    instance: Instance,
    reporting_instance: str,
    reason: EventReason,
    message: str,
    now: dt.datetime,
) -> Obj:
    """One events.k8s.io/v1 Event about the Job `job_name` of the attempt `key`."""
    regarding: Obj = {"apiVersion": "batch/v1", "kind": "Job", "namespace": namespace,
                      "name": job_name}  # fmt: skip
    if job_uid:
        regarding["uid"] = job_uid
    # Like client-go's recorders: the object's name and the time in hex (microseconds, and a
    # sequence number for two Events of one microsecond).
    stamp = f"{int(now.timestamp() * 1_000_000):x}{next(_SEQUENCE) % 4096:03x}"
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {
            "name": f"{job_name}.{stamp}",
            "namespace": namespace,
            "labels": {
                LABEL_INSTANCE: instance.label,
                LABEL_JOB_ID: str(key.job_id),
                LABEL_ATTEMPT: str(key.attempt),
            },
        },
        "eventTime": micro_time(now),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": reporting_instance[:FIELD_LIMIT] or "unknown",
        "action": reason.action,
        "reason": reason.value,
        "type": "Warning" if reason.warning else "Normal",
        "note": truncate_utf8(message, NOTE_LIMIT_BYTES),
        "regarding": regarding,
    }


class EventRecorder:
    """Posts Events with `post` on one worker thread (see the module's docstring)."""

    def __init__(
        self,
        post: Callable[[Obj], object],
        metrics: Metrics | None = None,
        capacity: int = QUEUE_CAPACITY,
        normal: TokenBucket | None = None,
    ) -> None:
        self._post = post
        self._metrics = metrics
        self._normal = normal or TokenBucket(NORMAL_EVENTS_PER_SECOND, NORMAL_BURST)
        self._queue: queue.Queue[Obj | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._lock = threading.Lock()
        self._last_log = -DROP_LOG_INTERVAL_SECONDS
        self._unlogged = 0
        self._forbidden_until = -FORBIDDEN_PAUSE_SECONDS
        #: Events dropped since the start (also in the metric, when there are metrics).
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Post what is queued, for at most about `timeout` seconds, then stop the worker."""
        if not self._thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def record(self, event: Obj) -> None:
        """Queue `event`; never blocks (a full queue drops it)."""
        if self.admit(event):
            self.enqueue(event)

    def admit(self, event: Obj) -> bool:
        """Whether an Event like `event` may be posted now (only its `type`, `reason` and
        `regarding.name` are read); if not, it is counted as dropped. Why apart from
        `record`: at 20 Jobs/s most Normal Events are over the rate limit, so a caller asks
        with a stub first and builds the Event only when it will be posted."""
        if time.monotonic() < self._forbidden_until:
            self.drop("refused", "403 Forbidden (not asking again for a while)", event)
            return False
        if event.get("type") == "Normal" and not self._normal.take():
            self.drop("rate_limited", "more Normal Events than NORMAL_EVENTS_PER_SECOND", event)
            return False
        return True

    def enqueue(self, event: Obj) -> None:
        """Queue an admitted `event`; never blocks (a full queue drops it)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.drop("queue_full", "the queue of Events to post is full", event)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._post(event)
            except ApiException as exc:
                if exc.status == 403:
                    self._forbidden_until = time.monotonic() + FORBIDDEN_PAUSE_SECONDS
                refused = 400 <= (exc.status or 0) < 500
                self.drop("refused" if refused else "error", f"{exc.status} {exc.reason}", event)
            except Exception as exc:
                self.drop("error", f"{type(exc).__name__}: {first_line(exc)}", event)

    def drop(self, why: str, error: str, event: Obj) -> None:
        """Count (and now and then log) an Event that will not be posted."""
        if self._metrics is not None:
            self._metrics.events_dropped.labels(why=why).inc()
        with self._lock:
            self.dropped += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._last_log < DROP_LOG_INTERVAL_SECONDS:
                return
            self._last_log, count, self._unlogged = now, self._unlogged, 0
        log.warning(
            "Kubernetes Event not posted",
            extra={"action": "event_dropped", "why": why, "error": error,
                   "event_reason": event.get("reason"), "dropped": count,
                   "runner_name": (event.get("regarding") or {}).get("name")},
        )  # fmt: skip
