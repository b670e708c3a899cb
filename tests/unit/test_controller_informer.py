"""The informer's tombstone rule, through its watch-event handlers and its relist. No API
server: the watch tests never call the list function; the relist test stands in for it
with a function returning one list page as the API server would (raw JSON bytes)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from controller.informer import Informer
from controller.kubestate import DELETED_MARK


def pod(name: str, job: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"job-name": job}}, "status": {}}


def never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("no API calls in this test")


def informer(alive_jobs: set[str], list_fn: Any = never) -> Informer:
    return Informer(
        "pods", list_fn, "ns", "", trim=lambda o: o, on_change=lambda: None,
        on_relist=lambda: None, api_timeout=1, watch_timeout=1, tombstones=True,
        index=lambda o: o["metadata"]["labels"]["job-name"],
        keep_tombstone=lambda o: o["metadata"]["labels"]["job-name"] in alive_jobs,
    )  # fmt: skip


def test_pod_deleted_under_a_live_job_is_remembered() -> None:
    cache = informer(alive_jobs={"job-a"})
    cache._store(pod("a-1", "job-a"))
    cache._remove(pod("a-1", "job-a"))
    kept = cache.get("a-1")
    assert kept is not None and kept[DELETED_MARK] is True
    assert [p["metadata"]["name"] for p in cache.by_index("job-a")] == ["a-1"]


def test_pod_of_a_job_going_away_leaves_no_tombstone() -> None:
    """A finished Job deleted by its TTL takes its pods with it: remembering them would only
    cost memory (thousands of dead pods an hour at batch rates)."""
    cache = informer(alive_jobs=set())
    cache._store(pod("b-1", "job-b"))
    cache._remove(pod("b-1", "job-b"))
    assert cache.get("b-1") is None
    assert cache.by_index("job-b") == []


def test_relist_keeps_tombstones_only_for_pods_of_live_jobs() -> None:
    """After a relist (API server restart, 410 Gone), pods missing from the list become
    tombstones only when their Job still lives; the others are simply gone."""
    page = {"metadata": {"resourceVersion": "7"}, "items": [pod("c-1", "job-c")]}

    def list_pods(*args: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(data=json.dumps(page).encode())

    cache = informer(alive_jobs={"job-a"}, list_fn=list_pods)
    for name, job in (("a-1", "job-a"), ("b-1", "job-b"), ("c-1", "job-c")):
        cache._store(pod(name, job))
    assert cache._relist() == "7"
    kept = cache.get("a-1")
    assert kept is not None and kept[DELETED_MARK] is True
    assert cache.get("b-1") is None
    assert cache.get("c-1") == pod("c-1", "job-c")


class EmptyWatch:
    """A watch response with no events."""

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return iter([])

    def release_conn(self) -> None:
        pass


def recording_list(asked: list[dict[str, Any]]) -> Any:
    """A list function that notes each call's arguments: an empty list page, or an empty
    watch."""
    page = {"metadata": {"resourceVersion": "7"}, "items": []}

    def list_fn(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs)
        if kwargs.get("watch"):
            return EmptyWatch()
        return SimpleNamespace(data=json.dumps(page).encode())

    return list_fn


def test_list_and_watch_use_the_selector_bound_before_start() -> None:
    """The executor binds its installation's selector after building its caches (the
    database says which installation it is): both the list and the watch must ask with it,
    or the cache would hold, and the sweep delete, other installations' Jobs."""
    asked: list[dict[str, Any]] = []
    cache = informer(alive_jobs=set(), list_fn=recording_list(asked))
    cache.selector = "app.kubernetes.io/managed-by=dharma-controller,dharma.stream/instance=a-1"
    version = cache._relist()
    cache._watch(version)
    assert [(bool(a.get("watch")), a["label_selector"]) for a in asked] == [
        (False, cache.selector),
        (True, cache.selector),
    ]


def test_a_field_selector_narrows_both_the_list_and_the_watch() -> None:
    """The pod cache leaves out Succeeded pods: asked of the list alone, a pod that has
    Succeeded would come back through the watch (and the other way round)."""
    asked: list[dict[str, Any]] = []
    cache = Informer(
        "pods", recording_list(asked), "ns", "a=b", trim=lambda o: o, on_change=lambda: None,
        on_relist=lambda: None, api_timeout=1, watch_timeout=1,
        field_selector="status.phase!=Succeeded",
    )  # fmt: skip
    cache._watch(cache._relist())
    assert [(bool(a.get("watch")), a["label_selector"], a["field_selector"]) for a in asked] == [
        (False, "a=b", "status.phase!=Succeeded"),
        (True, "a=b", "status.phase!=Succeeded"),
    ]


def test_updates_and_removals_are_told_but_not_a_tombstone() -> None:
    """`on_update` hears of each object stored, and of each that leaves the cache for good
    (by a DELETED event or by vanishing from a relist) — not of a pod kept as a tombstone."""
    told: list[tuple[str, bool]] = []
    page = {"metadata": {"resourceVersion": "9"}, "items": [pod("c-1", "job-c")]}
    cache = Informer(
        "pods", lambda *a, **k: SimpleNamespace(data=json.dumps(page).encode()), "ns", "",
        trim=lambda o: o, on_change=lambda: None, on_relist=lambda: None, api_timeout=1,
        watch_timeout=1, tombstones=True, index=lambda o: o["metadata"]["labels"]["job-name"],
        keep_tombstone=lambda o: o["metadata"]["labels"]["job-name"] == "job-a",
        on_update=lambda o, removed: told.append((o["metadata"]["name"], removed)),
    )  # fmt: skip
    for name, job in (("a-1", "job-a"), ("b-1", "job-b"), ("b-2", "job-b"), ("c-1", "job-c")):
        cache._store(pod(name, job))
    told.clear()
    cache._remove(pod("a-1", "job-a"))  # tombstone
    cache._remove(pod("b-1", "job-b"))
    assert told == [("b-1", True)]
    cache._relist()  # b-2 vanished; a-1 stays a tombstone
    assert told == [("b-1", True), ("b-2", True)]
    assert cache.get("a-1") is not None and cache.get("c-1") is not None
    cache._store(pod("c-1", "job-c"))
    assert told[-1] == ("c-1", False)


def test_dropping_a_jobs_tombstones_keeps_its_live_pods() -> None:
    cache = informer(alive_jobs={"job-a"})
    for name in ("a-1", "a-2"):
        cache._store(pod(name, "job-a"))
    cache._remove(pod("a-1", "job-a"))
    cache.drop_tombstones("job-a")
    assert cache.get("a-1") is None
    assert [p["metadata"]["name"] for p in cache.by_index("job-a")] == ["a-2"]
