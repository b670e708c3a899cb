"""The Kubernetes executor: one batch/v1 Job per attempt, observed through list+watch caches.

Launching is `create` of the deterministic Job (controller/jobspec.py); AlreadyExists means
the attempt was launched before (by this process before a crash, or by the previous leader)
once the existing Job's labels say so, so launching is exactly-once without any bookkeeping.
Everything is scoped to this installation (`Instance`, bound before `start`): the caches
list and watch only Jobs and pods with its instance label, and a Job without it is never
adopted, recorded or deleted (another release in the namespace; a database restored to an
older state, whose job ids repeat). Creates of one claimed batch run in
parallel (LAUNCH_CONCURRENCY). Observation reads only the caches; the API is asked directly
only to confirm that a recorded Job has really vanished (a cache may lag behind).

Client configuration: in-cluster service account, else KUBECONFIG (or ~/.kube/config).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.client.rest import RESTResponse
from kubernetes.config.config_exception import ConfigException

from controller import wire
from controller.events import EventRecorder, build_event
from controller.executor import EventReason, Launched, LaunchErrors
from controller.informer import Informer
from controller.jobspec import Instance, LaunchSpec, UnknownModel, build_job, job_name
from controller.kubestate import (
    foreign_labels,
    is_finished,
    observe_job,
    succeeded,
    trim_job,
    trim_pod,
)
from controller.metrics import Metrics
from controller.model import NOT_FOUND, JobRow, Observation, Phase, RunnerKey
from controller.settings import ControllerSettings
from dharma_common.contract import LABEL_ATTEMPT, LABEL_INSTANCE, LABEL_JOB_ID
from dharma_common.errors import first_line
from dharma_common.settings import ConfigError

log = logging.getLogger(__name__)
Obj = dict[str, Any]


_ACTIVE = (Phase.PENDING, Phase.RUNNING)
_JSON = "application/json"


class _Seen:
    """What the executor derived from one cached Job object, kept while the cache holds that
    very object (the informers replace an object on every change, never edit it in place, so
    `is` tells "unchanged"). Why: every pass looks at every live Job (alive) and at each
    row's Job (observe), and at 20 Jobs/s re-deriving them each pass was a fifth of the
    controller's CPU (docs/performance.md, "Steady-state CPU")."""

    __slots__ = ("_observation", "_pods", "job", "key")

    def __init__(self, job: Obj, key: RunnerKey | None) -> None:
        self.job = job
        self.key = key
        self._pods: list[Obj] | None = None
        self._observation: Observation | None = None

    def observe(self, pods: list[Obj]) -> Observation:
        """observe_job(job, pods), again only when a pod object changed."""
        known = self._pods
        if (
            self._observation is None
            or known is None
            or len(known) != len(pods)
            or any(a is not b for a, b in zip(known, pods, strict=True))
        ):
            self._observation = observe_job(self.job, pods)
            self._pods = pods
        return self._observation


#: The Job cache's index of the Jobs still running (see `alive`).
_LIVE = "live"


def _live(job: Obj) -> str | None:
    """Indexed under _LIVE unless finished or being deleted: decided once per Job object, in
    the watch's thread, so a pass walks the few live Jobs, not the many finished ones the
    cache keeps for JOB_TTL_SECONDS."""
    if job["metadata"].get("deletionTimestamp") or is_finished(job):
        return None
    return _LIVE


#: What the pod watch leaves out (KubernetesExecutor.__init__).
POD_FIELD_SELECTOR = "status.phase!=Succeeded"


def _job_of(pod: Obj) -> str | None:
    """The Job a pod belongs to (label set by the Job controller)."""
    labels = pod["metadata"].get("labels") or {}
    name = labels.get("batch.kubernetes.io/job-name") or labels.get("job-name")
    return str(name) if name else None


#: Connections held besides the launch pool's: the two watches, the Event poster, the Lease
#: and one for the service loop's own reads (verifying a Job is gone).
_OTHER_CONNECTIONS = 5


def load_api_client(launch_concurrency: int) -> client.ApiClient:
    """In-cluster configuration when running in a pod, else the KUBECONFIG file.

    The connection pool holds one connection per concurrent user (`launch_concurrency`
    creates at once, the watches, ...). The client's default, 5 per CPU, is 10 on a 2-CPU
    node, fewer than that: a create beyond it opens a TLS connection and drops it after one
    request, and handshakes are costly (they were a tenth of the controller's CPU at 20
    Jobs/s while Event posts kept connections out of the pool)."""
    configuration = client.Configuration()
    configuration.connection_pool_maxsize = launch_concurrency + _OTHER_CONNECTIONS
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return client.ApiClient(configuration)
    except ConfigException:
        pass
    try:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return client.ApiClient(configuration)
    except (ConfigException, OSError, TypeError) as exc:
        raise ConfigError(
            "KUBECONFIG: no in-cluster service account and no usable kubeconfig "
            f"(set KUBECONFIG, or use --executor local): {exc}"
        ) from None


def _status_reason(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "{}")
        return f"{exc.status} {body.get('reason', '')}: {body.get('message', '')}".strip()
    except (ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"


class JsonPosts:
    """POST a JSON body (a Job, an Event) through the client's connection pool, host and
    authentication, without its model layer.

    Why: given a dict, the generated API validates it into its pydantic model (V1Job) and
    dumps it back before sending; at 20 Jobs/s that was a third of the controller's CPU
    (docs/performance.md, "Steady-state CPU"). Its REST layer then walks the dict again
    (`sanitize_for_serialization`) and encodes it with the standard library: the body is
    encoded here once, with orjson, and handed to the pool as bytes (0.70 -> 0.58 ms of CPU
    per create, measured against the testbed). The client still builds the URL and the
    headers, bearer token included (an in-cluster token is re-read as it rotates). A status
    outside 2xx raises the same ApiException the generated API raises, so callers handle
    both alike; a connection or TLS error is urllib3's own (the generated API turns a TLS
    error into an ApiException with status 0): callers treat any other exception as one to
    retry on the next pass."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api

    def post(self, path: str, namespace: str, body: Obj, timeout: float) -> Obj:
        """POST `body` to `path` (with a `{namespace}` placeholder); the created object."""
        _, url, headers, _, _ = self._api.param_serialize(
            method="POST", resource_path=path, path_params={"namespace": namespace},
            header_params={"Content-Type": _JSON, "Accept": _JSON}, auth_settings=["BearerToken"],
        )  # fmt: skip
        response: Any = RESTResponse(self._api.rest_client.pool_manager.request(
            "POST", url, body=orjson.dumps(body), headers=headers,
            timeout=urllib3.Timeout(total=timeout), preload_content=False,
        ))  # fmt: skip
        data = response.read()  # all of it: the connection goes back to the pool
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        created: Obj = wire.loads(data)
        return created


class KubernetesExecutor:
    kind = "kubernetes"
    #: The leader owns every processing row and sees every runner: nothing is abandoned.
    owner: str | None = None
    abandoned_after: float | None = None

    def __init__(
        self,
        settings: ControllerSettings,
        api: client.ApiClient,
        metrics: Metrics | None = None,
        instance: Instance | None = None,
    ) -> None:
        self._settings = settings
        self._instance = instance
        # Any: bodies and responses are raw JSON (_preload_content=False), not models.
        self._batch: Any = client.BatchV1Api(api)
        self._core: Any = client.CoreV1Api(api)
        self._posts = JsonPosts(api)
        self._metrics = metrics
        self._events = EventRecorder(self._post_event, metrics)
        self._pool = ThreadPoolExecutor(settings.LAUNCH_CONCURRENCY, thread_name_prefix="create")
        self._wake: Callable[[], None] = lambda: None
        self._launch_errors = LaunchErrors()
        #: Job name -> what was derived from its cached object; the service loop's thread
        #: alone reads and writes it (observe, alive).
        self._seen: dict[str, _Seen] = {}
        common = {
            "namespace": settings.NAMESPACE,
            # Set by bind(): nothing is listed or watched before the instance is known.
            "selector": instance.selector if instance else "",
            "on_change": self._changed,
            "api_timeout": settings.KUBE_API_TIMEOUT_SECONDS,
            "watch_timeout": settings.KUBE_WATCH_TIMEOUT_SECONDS,
        }
        self.jobs = Informer(
            "jobs", self._batch.list_namespaced_job, trim=trim_job, index=_live,
            on_relist=lambda: self._relisted("jobs"), on_update=self._job_updated,
            **common,  # type: ignore[arg-type]
        )  # fmt: skip
        # Pods that have Succeeded are not watched (POD_FIELD_SELECTOR): a third of a pod's
        # events come after it (finalizer removed, deleting, deleted) and none of them changes
        # an observation, since the Job's own Complete condition follows. The pod leaves the
        # cache as a tombstone of its last running state, which observe_job reads as "wait
        # for the Job's verdict": the rule for a pod deleted under a running Job.
        self.pods = Informer(
            "pods", self._core.list_namespaced_pod, trim=trim_pod, tombstones=True, index=_job_of,
            keep_tombstone=self._job_alive, on_relist=lambda: self._relisted("pods"),
            field_selector=POD_FIELD_SELECTOR, **common,  # type: ignore[arg-type]
        )  # fmt: skip

    def _job_alive(self, pod: Obj) -> bool:
        """Is the pod's Job still there, not being deleted, and not succeeded? Only then does
        "its pod was deleted" say something (the TTL controller deletes finished Jobs in the
        foreground: the Job carries a deletionTimestamp while its pods go; a successful Job's
        verdict is read before any pod)."""
        name = _job_of(pod)
        job = self.jobs.get(name) if name else None
        return (
            job is not None and not job["metadata"].get("deletionTimestamp") and not succeeded(job)
        )

    def _job_updated(self, job: Obj, removed: bool) -> None:
        """A Job that succeeded or is gone takes its pods' tombstones with it: observe_job
        reads a successful Job's verdict before any pod, and a Succeeded pod's later events
        never come (it left the pod watch). A failed Job keeps them: a deleted pod is what its
        failure is reported as. (A pod that leaves the watch just after its Job's success
        was seen on the other watch is not kept: `_job_alive`.)"""
        if removed or succeeded(job):
            self.pods.drop_tombstones(job["metadata"]["name"])

    def bind(self, instance: Instance) -> None:
        """Scope this executor to one installation (before `start`): the caches select its
        Jobs and pods, names carry its hash, and adopting or deleting checks its label."""
        self._instance = instance
        self.jobs.selector = self.pods.selector = instance.selector

    @property
    def instance(self) -> Instance:
        if self._instance is None:
            raise RuntimeError("KubernetesExecutor used before bind(instance)")
        return self._instance

    def _name(self, key: RunnerKey) -> str:
        return job_name(self._settings, self.instance, key.job_id, key.attempt)

    def _relisted(self, resource: str) -> None:
        if self._metrics is not None:
            self._metrics.relists.labels(resource=resource).inc()

    def _changed(self) -> None:
        self._wake()

    # ------------------------------------------------------------------ lifecycle ---

    def start(self, wake: Callable[[], None]) -> None:
        self.instance  # noqa: B018 - raises unless bound: never watch every installation's Jobs
        self._wake = wake
        self.jobs.start()
        self.pods.start()
        self._events.start()

    def synced(self) -> bool:
        return self.jobs.synced.is_set() and self.pods.synced.is_set()

    def problems(self) -> list[str]:
        return [p for p in (self.jobs.problem(), self.pods.problem()) if p]

    def shutdown(self) -> list[RunnerKey]:
        """Stop watching. Running Jobs are left alone: the next leader adopts them."""
        self.jobs.stop()
        self.pods.stop()
        self._pool.shutdown(wait=True)
        self._events.stop(timeout=min(5.0, self._settings.KUBE_API_TIMEOUT_SECONDS))
        return []

    # ------------------------------------------------------------------ launching ---

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        results = list(self._pool.map(self._create, specs))
        for result in results:
            self._launch_errors.note(result)
        return results

    def _create(self, spec: LaunchSpec) -> Launched:
        key = RunnerKey(spec.job_id, spec.attempt)
        name = self._name(key)
        try:
            body = build_job(self._settings, spec, self.instance)
        except UnknownModel as exc:  # reconcile.decide fails the attempt, naming the model
            return Launched(key, None, error=str(exc), invalid=True)
        try:
            created = self._posts.post(
                "/apis/batch/v1/namespaces/{namespace}/jobs", self._settings.NAMESPACE, body,
                self._settings.KUBE_API_TIMEOUT_SECONDS,
            )  # fmt: skip
            self.jobs.put(created)
            return Launched(key, name)
        except ApiException as exc:
            if exc.status == 409:  # AlreadyExists: launched before, if the labels say so
                return self._existing(key, name)
            invalid = exc.status in (400, 422)
            return Launched(key, None, error=f"creating Job {name}: {_status_reason(exc)}",
                            invalid=invalid)  # fmt: skip
        except Exception as exc:  # connection errors: retried on the next pass
            return Launched(key, None, error=f"creating Job {name}: {type(exc).__name__}: {exc}")

    def _existing(self, key: RunnerKey, name: str) -> Launched:
        """The Job with this attempt's name already exists: ours from before a crash or from
        the previous leader (adopt it), or a Job this attempt must not take as its own."""
        try:
            response = self._batch.read_namespaced_job(
                name, self._settings.NAMESPACE, _preload_content=False,
                _request_timeout=self._settings.KUBE_API_TIMEOUT_SECONDS,
            )  # fmt: skip
            job = json.loads(response.data)
        except ApiException as exc:  # e.g. deleted in between: try again on the next pass
            return Launched(key, None, error=f"reading existing Job {name}: {_status_reason(exc)}")
        except Exception as exc:
            return Launched(key, None, error=f"reading existing Job {name}: {first_line(exc)}")
        wrong = foreign_labels(job, key, self.instance.label)
        if wrong:
            error = f"Job {name} already exists but is not this attempt's ({wrong})"
            return Launched(key, None, error=error, foreign=True)
        self.jobs.put(job)
        return Launched(key, name)

    # ------------------------------------------------------------------ observing ---

    def _pods_of(self, name: str) -> list[Obj]:
        return self.pods.by_index(name)

    def observe(self, key: RunnerKey) -> Observation:
        name = self._name(key)
        job = self.jobs.get(name)
        if job is None or foreign_labels(job, key, self.instance.label):
            # A Job of that name that is not this attempt's says nothing.
            return self._launch_errors.get(key) or NOT_FOUND
        return self._seen_of(name, job).observe(self._pods_of(name))

    def _seen_of(self, name: str, job: Obj, known: dict[str, _Seen] | None = None) -> _Seen:
        """What was derived from this Job object (`known`: where to look, by default what
        this pass has seen so far), kept in `_seen` for the rest of the pass and the next."""
        seen = (self._seen if known is None else known).get(name)
        if seen is None or seen.job is not job:
            seen = _Seen(job, self._key(job))
        self._seen[name] = seen
        return seen

    def observe_abandoned(self, row: JobRow) -> Observation:
        """Never asked (`abandoned_after` is None): every runner is observed directly."""
        return self.observe(row.key)

    def verify_gone(self, key: RunnerKey, runner_name: str) -> Observation:
        try:
            response = self._batch.read_namespaced_job(
                runner_name, self._settings.NAMESPACE, _preload_content=False,
                _request_timeout=self._settings.KUBE_API_TIMEOUT_SECONDS,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return Observation(Phase.DELETED, runner_name=runner_name, deleted_kind="Job")
            log.warning(
                "cannot confirm a Job",
                extra={"action": "job_verify_failed", "error": _status_reason(exc)},
            )
            return NOT_FOUND
        except Exception as exc:
            log.warning(
                "cannot confirm a Job",
                extra={"action": "job_verify_failed", "error": first_line(exc)},
            )
            return NOT_FOUND
        job = json.loads(response.data)
        if foreign_labels(job, key, self.instance.label):  # not this attempt's Job (any more)
            return Observation(Phase.DELETED, runner_name=runner_name, deleted_kind="Job")
        self.jobs.put(job)
        return observe_job(trim_job(job), self._pods_of(runner_name))

    def _key(self, job: Obj) -> RunnerKey | None:
        """The attempt a cached Job runs, if it is this installation's: its instance label
        and its name must both be ours (the selector already asks for the label; this keeps
        a Job put into the cache by other means from being swept as ours)."""
        meta = job["metadata"]
        labels = meta.get("labels") or {}
        if labels.get(LABEL_INSTANCE) != self.instance.label:
            return None
        try:
            key = RunnerKey(int(labels[LABEL_JOB_ID]), int(labels[LABEL_ATTEMPT]))
        except (KeyError, ValueError):
            return None
        return key if meta.get("name") == self._name(key) else None

    def alive(self) -> list[RunnerKey]:
        """Jobs whose runner has not ended. A pod that ended counts as ended even before the
        Job controller marks the Job (its outcome may already be recorded: deleting the Job
        then would only lose its logs). Also sets the pending-runner gauges (metrics)."""
        keys = []
        waited: list[float] = []
        now = dt.datetime.now(dt.timezone.utc)
        previous, self._seen = self._seen, {}  # Jobs no longer live are forgotten here
        for job in self.jobs.by_index(_LIVE):
            name = job["metadata"]["name"]
            seen = self._seen_of(name, job, previous)
            if seen.key is None:  # not this installation's: never alive, never swept
                continue
            observed = seen.observe(self._pods_of(name))
            if observed.phase not in _ACTIVE:
                continue
            keys.append(seen.key)
            if observed.phase is Phase.PENDING:
                since = observed.since
                waited.append(max(0.0, (now - since).total_seconds()) if since else 0.0)
        if self._metrics is not None:
            # Here because this walk is the one place every runner is observed each pass.
            self._metrics.runners_pending.set(len(waited))
            self._metrics.runner_oldest_pending.set(max(waited, default=0.0))
        return keys

    def finished_unclaimed(self) -> list[RunnerKey]:
        return []

    def delete(self, key: RunnerKey) -> bool:
        """Delete this installation's Job of `key`: the name carries the instance hash, so
        another installation's Job of the same job id and attempt is never hit."""
        name = self._name(key)
        self._launch_errors.forget(key)
        try:
            self._batch.delete_namespaced_job(
                name, self._settings.NAMESPACE, propagation_policy="Background",
                _request_timeout=self._settings.KUBE_API_TIMEOUT_SECONDS,
            )  # fmt: skip
            log.info("deleted Job", extra={"action": "job_deleted", "runner_name": name})
        except ApiException as exc:
            if exc.status == 404:
                return True
            error = _status_reason(exc)
        except Exception as exc:
            error = first_line(exc)
        else:
            return True
        log.warning(
            "cannot delete Job",
            extra={"action": "job_delete_failed", "runner_name": name, "error": error},
        )
        return False

    def forget(self, key: RunnerKey) -> None:
        """Finished Jobs stay until ttlSecondsAfterFinished, for `kubectl logs`; only the
        memory of failed launches is released."""
        self._launch_errors.forget(key)

    # ------------------------------------------------------------------ events ---

    def record_event(self, key: RunnerKey, reason: EventReason, message: str) -> None:
        """An Event on the attempt's Job, posted by the recorder's thread (controller/events.py):
        by uid too when the cache has the Job (and it is this attempt's), else by name only."""
        try:
            name = self._name(key)
            stub = {"type": "Warning" if reason.warning else "Normal", "reason": reason.value,
                    "regarding": {"name": name}}  # fmt: skip
            if not self._events.admit(stub):
                return
            job = self.jobs.get(name)
            uid = None
            if job is not None and not foreign_labels(job, key, self.instance.label):
                uid = job["metadata"].get("uid")
            event = build_event(
                namespace=self._settings.NAMESPACE, job_name=name, job_uid=uid, key=key,
                instance=self.instance, reporting_instance=self._settings.identity(),
                reason=reason, message=message, now=dt.datetime.now(dt.timezone.utc),
            )  # fmt: skip
        except Exception as exc:  # a bug here must not fail the loop: the Event is dropped
            self._events.drop("error", first_line(exc), {"reason": reason.value})
            return
        self._events.enqueue(event)

    def _post_event(self, event: Obj) -> None:
        self._posts.post(
            "/apis/events.k8s.io/v1/namespaces/{namespace}/events", self._settings.NAMESPACE,
            event, self._settings.KUBE_API_TIMEOUT_SECONDS,
        )  # fmt: skip
