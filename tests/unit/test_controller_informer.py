"""The informer's tombstone rule, through its watch-event handlers (no API server needed:
the list function is never called)."""

from __future__ import annotations

from typing import Any

from controller.informer import Informer
from controller.kubestate import DELETED_MARK


def pod(name: str, job: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"job-name": job}}, "status": {}}


def informer(alive_jobs: set[str]) -> Informer:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no API calls in this test")

    return Informer(
        "pods", never, "ns", "", trim=lambda o: o, on_change=lambda: None,
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
