"""The runner's final commit, played for pods whose container KWOK only simulates.

Why: the controller records an attempt `completed` only over the runner's own commit (its
final fenced transaction sets `result_attempt` to the attempt, then it exits 0); a Job that
merely completed proves nothing and ends as a retryable failure. On the KWOK test cluster no
runner runs: a pod annotated `testbed.dharma/fate: succeed` turns Running, then Succeeded
after `testbed.dharma/delay` (testbed/stages/pod.yaml), and nothing ever commits. So tests
and benchmarks whose simulated pods are meant to succeed run `SimulatedCommits` beside them:
for every such pod it runs the runner's `mark_result` statement (jobrunner/queries.sql, read
from there so the two cannot drift) for that pod's attempt, once the pod runs and before the
simulated container exits — what the real runner's last transaction does, and nothing else
(no subtitles, no media duration: a simulated container transcribes nothing).

Which pods: those with the controller's labels (`MANAGED_SELECTOR`; job id and attempt from
`LABEL_JOB_ID` / `LABEL_ATTEMPT`) whose effective fate, computed as the pod-finish Stage does,
is `succeed` (the annotation, or, absent, `succeed` for a pod owned by a Job), once they are
Running (or already Succeeded, when a relist after a dropped watch is the first sight), and
not being deleted (KWOK never finishes a terminating pod). Never a pod with another fate
(fail, oom, external, image-pull-error, ...), and never a Pending one: a runner commits at the
end of its run, and a commit for a pod stuck Pending would hide the pending timeout.

It is a list+watch of pods (events arrive within milliseconds, far inside the shortest
simulated delay) feeding a committer with its own database connection: the extra writes are
the runner's, never counted as the controller's. Both survive what the chaos suite does:
an API server restart (relist and watch again), a PostgreSQL restart or crash (reconnect and
commit what is due), silently, until `stop()`.

Scope: give it the namespace whose runners belong to the given database. All namespaces
(`namespace=None`) only when every runner in the cluster belongs to that database: job ids
of other tests' databases would match rows of this one. Where several installations share a
namespace, pass `selector=Instance.selector` of the one whose database `connect` opens.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controller import wire
from controller.jobspec import MANAGED_SELECTOR
from devtools.kwok import FATE
from dharma_common.contract import LABEL_ATTEMPT, LABEL_JOB_ID
from dharma_common.errors import first_line
from dharma_common.sqlfile import load_queries

log = logging.getLogger(__name__)
Obj = dict[str, Any]
Key = tuple[int, int]

#: The runner's own final statement: fenced on (id, attempts, status = 'processing').
MARK_RESULT = load_queries("jobrunner", "queries.sql")["mark_result"]
LIST_PAGE_SIZE = 500


class _Relist(Exception):
    """The watch cannot resume (410 Gone, or an error event): list again."""


def simulated_fate(pod: Obj) -> str:
    """The fate KWOK plays for this pod (testbed/stages/pod.yaml, Stage pod-finish): the
    `testbed.dharma/fate` annotation, else `succeed` for a pod owned by a Job, else `run`."""
    meta = pod.get("metadata") or {}
    fate = (meta.get("annotations") or {}).get(FATE)
    if fate is not None:
        return str(fate) or "succeed"  # the Stage's template defaults an empty one
    owned_by_job = any(ref.get("kind") == "Job" for ref in meta.get("ownerReferences") or [])
    return "succeed" if owned_by_job else "run"


def commit_due(pod: Obj) -> Key | None:
    """(job id, attempt) if a real runner in this pod would have committed by now: a runner
    pod KWOK will succeed, running (or already succeeded) and not being deleted."""
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp") or simulated_fate(pod) != "succeed":
        return None
    if (pod.get("status") or {}).get("phase") not in ("Running", "Succeeded"):
        return None
    labels = meta.get("labels") or {}
    try:
        return int(labels[LABEL_JOB_ID]), int(labels[LABEL_ATTEMPT])
    except (KeyError, TypeError, ValueError):
        return None


class SimulatedCommits:
    """Commit `result_attempt` for every simulated runner pod that is to succeed (see the
    module's docstring). `start()` returns once the first list is done (so no pod is
    missed); use as a context manager, or `start()` / `stop()`.

    `connect` returns a new DB-API connection to the runners' database (called again after
    the database went away); `api_client` is a Kubernetes client allowed to list and watch
    pods there.
    """

    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str | None,
        connect: Callable[[], Any],
        *,
        api_timeout: float = 10.0,
        watch_timeout: int = 60,
        selector: str = MANAGED_SELECTOR,
    ) -> None:
        core: Any = client.CoreV1Api(api_client)  # Any: raw responses (_preload_content)
        self._core = core
        self._selector = selector
        self.namespace = namespace
        self._connect = connect
        self._api_timeout = api_timeout
        self._watch_timeout = watch_timeout
        self._due: queue.Queue[Key] = queue.Queue()
        self._queued: set[Key] = set()  # only the watch thread touches it
        self._stop = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()
        #: Commits that set result_attempt, and those that matched no row (the attempt no
        #: longer owns it: cancelled, or the controller already gave up on it).
        self.committed = 0
        self.fenced = 0
        #: Connection or API errors ridden through (retried), and the last one, for reports.
        self.errors = 0
        self.last_error: str | None = None
        self._threads = [
            threading.Thread(target=self._watch_loop, name="simulated-runner-watch", daemon=True),
            threading.Thread(target=self._commit_loop, name="simulated-runner-commit",
                             daemon=True),
        ]  # fmt: skip

    # ------------------------------------------------------------------ life cycle ---

    def start(self, timeout: float = 60.0) -> SimulatedCommits:
        for thread in self._threads:
            thread.start()
        if not self.synced.wait(timeout):
            self.stop()
            raise RuntimeError(
                f"the simulated runner's pod list did not succeed within {timeout:.0f} s"
                f" (last error: {self.last_error})"
            )
        return self

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # unblock a read waiting for an event
                response.shutdown()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)

    def __enter__(self) -> SimulatedCommits:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _error(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {first_line(exc)}"
        log.debug("simulated runner: %s; retrying", self.last_error)

    # ------------------------------------------------------------------ pods ---

    def _list(self, **kwargs: Any) -> Any:
        kwargs.update(label_selector=self._selector, _preload_content=False)
        if self.namespace is None:
            return self._core.list_pod_for_all_namespaces(**kwargs)
        return self._core.list_namespaced_pod(self.namespace, **kwargs)

    def _see(self, pod: Obj) -> None:
        key = commit_due(pod)
        if key is not None and key not in self._queued:
            self._queued.add(key)
            self._due.put(key)

    def _watch_loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                version = self._relist()
                self.synced.set()
                backoff = 0.05
                while not self._stop.is_set():
                    version = self._watch(version)
            except _Relist:
                continue
            except Exception as exc:  # the API server restarting: list again shortly
                if self._stop.is_set():
                    return
                self._error(exc)
                self._stop.wait(backoff)
                backoff = min(1.0, backoff * 2)

    def _relist(self) -> str:
        token: str | None = None
        version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                kwargs["_continue"] = token
            body = wire.loads(self._list(_request_timeout=self._api_timeout, **kwargs).data)
            for pod in body.get("items") or []:
                self._see(pod)
            meta = body.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            if not token:
                return version

    def _watch(self, version: str) -> str:
        response = self._list(
            watch=True, resource_version=version, allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _request_timeout=(self._api_timeout, self._watch_timeout + self._api_timeout),
        )  # fmt: skip
        self._response = response
        try:
            for line in wire.lines(response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = wire.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Relist()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED"):
                    self._see(obj)
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return version

    # ------------------------------------------------------------------ commits ---

    def _commit_loop(self) -> None:
        conn: Any = None
        pending: list[Key] = []
        backoff = 0.05
        while not self._stop.is_set():
            if not pending:
                try:
                    pending.append(self._due.get(timeout=0.1))
                except queue.Empty:
                    continue
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(self._due.get_nowait())
            try:
                if conn is None:
                    conn = self._connect()
                    conn.autocommit = True
                while pending and not self._stop.is_set():
                    job_id, attempt = pending[0]
                    with conn.cursor() as cur:
                        cur.execute(MARK_RESULT, {"job_id": job_id, "attempt": attempt})
                        changed = cur.rowcount
                    pending.pop(0)
                    if changed:
                        self.committed += 1
                    else:
                        self.fenced += 1
                backoff = 0.05
            except Exception as exc:  # PostgreSQL restarting: reconnect, commit what is due
                self._error(exc)
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                self._stop.wait(backoff)
                backoff = min(0.5, backoff * 2)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
