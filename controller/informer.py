"""A list+watch cache of one resource (the controller's Jobs, or their pods).

The classic informer loop, kept small: list (paginated) to get a complete picture and a
resourceVersion, then watch from that resourceVersion. When a watch request ends normally
(KUBE_WATCH_TIMEOUT_SECONDS), resume from the last resourceVersion seen (bookmarks keep it
fresh). When the API server says 410 Gone (the version was compacted away, e.g. after a long
disconnection) or the connection drops (API server restart), relist: events missed while
away are never lost, because the list is the truth and the service loop reconciles rows
against it. Objects are cached as trimmed dicts (no model deserialisation: thousands of
objects stay cheap).

Deleted pods are kept as tombstones for a while, so "the pod was deleted externally" can
still be reported after the object has vanished — but only while that can matter: a pod
deleted because its Job is going away (TTL after finishing, cancellation) leaves none
(`keep_tombstone`), or a steady stream of finished Jobs would hold thousands of dead pods
(bench/load.py's soak: RSS +90 MiB at 20 Jobs/s before this rule).

A cache may also narrow what it watches with a field selector (the pod cache leaves out
pods that have Succeeded: see KubernetesExecutor). An object that stops matching comes as a
DELETED event, like a deletion — the API server cannot say which — so it is handled as one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from controller import wire
from controller.kubestate import DELETED_MARK
from controller.threads import Backoff, WatchedThread
from dharma_common.errors import first_line

log = logging.getLogger(__name__)
Obj = dict[str, Any]
#: How long a deleted pod is remembered.
TOMBSTONE_SECONDS = 600.0
#: A watch waits this long after its last event before reading on, when nothing more has
#: arrived: events are read in batches (controller/wire.py `lines`). Small against the
#: passes' own spacing (MIN_PASS_INTERVAL_SECONDS).
WATCH_SETTLE_SECONDS = 0.05
#: Objects per list page. Small on purpose: a relist (API server restart, 410 Gone) happens
#: when the cache is full, and each page is held as raw bytes plus fully decoded objects
#: (~15 KB per pod) until it is trimmed; 500 per page raised the controller's peak RSS by
#: tens of MB with 2,000 Jobs cached (bench/controller.py).
LIST_PAGE_SIZE = 100


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): relist."""


class Informer:
    def __init__(
        self,
        resource: str,
        list_fn: Callable[..., Any],
        namespace: str,
        selector: str,
        trim: Callable[[Obj], Obj],
        on_change: Callable[[], None],
        on_relist: Callable[[], None],
        api_timeout: float,
        watch_timeout: int,
        tombstones: bool = False,
        index: Callable[[Obj], str | None] | None = None,
        keep_tombstone: Callable[[Obj], bool] = lambda obj: True,
        field_selector: str = "",
        on_update: Callable[[Obj, bool], None] | None = None,
    ) -> None:
        self.resource = resource
        self._list = list_fn
        self._namespace = namespace
        #: Label selector of every list and watch; may be set until `start` (KubernetesExecutor
        #: binds its installation's selector late, once the database has said which it is).
        self.selector = selector
        #: Narrows the list and the watch further (e.g. `status.phase!=Succeeded`).
        self._field_selector = field_selector
        #: Told, outside the cache's lock, of each object stored from a watch event or a
        #: create (`removed` False) and of each that left without a tombstone (deleted,
        #: vanished at a relist: `removed` True).
        self._on_update = on_update
        self._trim = trim
        self._on_change = on_change
        self._on_relist = on_relist
        self._api_timeout = api_timeout
        self._watch_timeout = watch_timeout
        self._tombstones = tombstones
        self._keep_tombstone = keep_tombstone
        self._items: dict[str, Obj] = {}
        #: Optional secondary index (pods by their Job's name): key -> object names.
        self._index_fn = index
        self._index: dict[str, set[str]] = {}
        #: Each indexed object's key, as computed when it was stored (not again on removal).
        self._keys: dict[str, str] = {}
        self._deleted_at: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()
        self._thread = WatchedThread(self._run, f"watch-{resource}")

    # ------------------------------------------------------------------ reading ---

    def get(self, name: str) -> Obj | None:
        with self._lock:
            return self._items.get(name)

    def by_index(self, key: str) -> list[Obj]:
        with self._lock:
            names = self._index.get(key, ())
            return [self._items[n] for n in names if n in self._items]

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._items.values())

    def put(self, obj: Obj) -> None:
        """Insert what a create returned, so the cache does not lag behind our own writes."""
        self._store(self._trim(obj))

    # ------------------------------------------------------------------ lifecycle ---

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # best effort to unblock a blocked read
                response.shutdown()
        self._thread.stop(timeout=5)

    def problem(self) -> str | None:
        """Why this cache no longer follows the API server (its thread died), else None."""
        return self._thread.problem()

    def _run(self) -> None:
        backoff = Backoff(first=0.2, cap=10.0)
        while not self._stop.is_set():
            try:
                version = self._relist()
                backoff.reset()
                while not self._stop.is_set():
                    version = self._watch(version)
            except Gone:
                log.info(
                    "watch expired (410 Gone); relisting",
                    extra={"action": "watch_expired", "resource": self.resource},
                )
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                log.warning(
                    "watch connection lost; relisting",
                    extra={
                        "action": "watch_lost",
                        "resource": self.resource,
                        "error": first_line(exc),
                        "retry_in_seconds": backoff.delay,
                    },
                )
                backoff.wait(self._stop)

    # ------------------------------------------------------------------ list & watch ---

    def _relist(self) -> str:
        fresh: dict[str, Obj] = {}
        token: str | None = None
        version = ""
        while True:
            kwargs: dict[str, Any] = {"limit": LIST_PAGE_SIZE, **self._selectors()}
            if token:
                kwargs["_continue"] = token
            response = self._list(
                self._namespace, _preload_content=False,
                _request_timeout=self._api_timeout, **kwargs,
            )  # fmt: skip
            body = wire.loads(response.data)
            for obj in body.get("items") or []:
                trimmed = self._trim(obj)
                fresh[trimmed["metadata"]["name"]] = trimmed
            meta = body.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            if not token:
                break
        now = time.monotonic()
        with self._lock:
            vanished = [o for n, o in self._items.items() if n not in fresh]
        # Asked outside our lock: the predicate may read another informer. (Only this
        # informer's own thread writes its items, so they cannot change in between.)
        kept = [o for o in vanished if self._tombstones and self._keep_tombstone(o)]
        with self._lock:
            for obj in kept:
                name = obj["metadata"]["name"]
                if not obj.get(DELETED_MARK):
                    self._deleted_at[name] = now
                    fresh[name] = {**obj, DELETED_MARK: True}
                elif now - self._deleted_at.get(name, now) < TOMBSTONE_SECONDS:
                    fresh[name] = obj
            self._items = fresh
            self._index = {}
            self._keys = {}
            for name, obj in fresh.items():
                self._add_to_index(name, obj)
        if self._on_update is not None:
            for obj in vanished:
                if obj["metadata"]["name"] not in fresh:
                    self._on_update(obj, True)
        self._on_relist()
        self.synced.set()
        self._on_change()
        return version

    def _watch(self, version: str) -> str:
        response = self._list(
            self._namespace,
            **self._selectors(),
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self._watch_timeout,
            _preload_content=False,
            _request_timeout=(self._api_timeout, self._watch_timeout + self._api_timeout),
        )
        self._response = response
        try:
            for line in wire.lines(response, settle=WATCH_SETTLE_SECONDS, stop=self._stop):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = wire.loads(line)  # ~10 per Job: controller/wire.py
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                trimmed = self._trim(obj)
                if kind == "DELETED":
                    self._remove(trimmed)
                else:
                    self._store(trimmed)
                self._on_change()
        finally:
            self._response = None
            response.release_conn()
        self._expire_tombstones()
        log.debug(
            "watch ended; resuming",
            extra={"action": "watch_resumed", "resource": self.resource, "version": version},
        )
        return version

    def _selectors(self) -> dict[str, str]:
        if self._field_selector:
            return {"label_selector": self.selector, "field_selector": self._field_selector}
        return {"label_selector": self.selector}

    def _add_to_index(self, name: str, obj: Obj) -> None:
        key = self._index_fn(obj) if self._index_fn else None
        if key is not None:
            self._index.setdefault(key, set()).add(name)
            self._keys[name] = key

    def _drop_from_index(self, name: str) -> None:
        key = self._keys.pop(name, None)
        if key is not None and key in self._index:
            self._index[key].discard(name)
            if not self._index[key]:
                del self._index[key]

    def _store(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            self._drop_from_index(name)
            self._items[name] = obj
            self._add_to_index(name, obj)
            self._deleted_at.pop(name, None)
        if self._on_update is not None:
            self._on_update(obj, False)

    def _remove(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        # Asked before taking our lock: the predicate may read another informer.
        keep = self._tombstones and self._keep_tombstone(obj)
        with self._lock:
            self._drop_from_index(name)
            if keep:
                self._items[name] = {**obj, DELETED_MARK: True}
                self._add_to_index(name, self._items[name])
                self._deleted_at[name] = time.monotonic()
            else:
                self._forget(name)
        if not keep and self._on_update is not None:
            self._on_update(obj, True)

    def drop_tombstones(self, key: str) -> None:
        """Forget the tombstones filed under index `key` (a Job's pods once the Job has
        succeeded or is gone: nothing asks about them any more). Live objects stay; they get
        their own events."""
        with self._lock:
            for name in list(self._index.get(key, ())):
                if self._items.get(name, {}).get(DELETED_MARK):
                    self._forget(name)

    def _expire_tombstones(self) -> None:
        now = time.monotonic()
        with self._lock:
            for name, when in list(self._deleted_at.items()):
                if now - when > TOMBSTONE_SECONDS:
                    self._forget(name)

    def _forget(self, name: str) -> None:
        """Drop `name` from the cache, its index and its tombstone clock (under our lock)."""
        self._drop_from_index(name)
        self._items.pop(name, None)
        self._deleted_at.pop(name, None)
