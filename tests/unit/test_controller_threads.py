"""Background threads the service loop depends on (watches, lease, LISTEN) must not die
silently: an exception's first line is taken safely, and a thread that ended unexpectedly
makes the probes fail with its name and why."""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any
from urllib.error import HTTPError

import pytest

from controller.informer import Informer
from controller.lease import LeaseElector
from controller.metrics import Health, Metrics, ProbeServer
from controller.settings import ControllerSettings
from controller.threads import Backoff
from dharma_common.errors import first_line


class Silent(Exception):
    """An exception with an empty message (str(exc) == "")."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (Silent(), "Silent"),
        (ValueError(""), "ValueError"),
        (ValueError("   \n  "), "ValueError"),
        (ValueError("first\nsecond"), "first"),
        (ValueError("\n  padded first  \nsecond"), "padded first"),
        (OSError(111, "Connection refused"), "[Errno 111] Connection refused"),
        (ValueError("x" * 500), "x" * 300),
    ],
    ids=["empty", "empty string", "blank lines", "multiline", "leading newline", "oserror",
         "long"],
)  # fmt: skip
def test_first_line(exc: BaseException, expected: str) -> None:
    assert first_line(exc) == expected


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _raising(exc: BaseException) -> Any:
    def list_fn(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return list_fn


def _informer(list_fn: Any) -> Informer:
    return Informer(
        "pods", list_fn, "ns", "", trim=lambda o: o, on_change=lambda: None,
        on_relist=lambda: None, api_timeout=1, watch_timeout=1,
    )  # fmt: skip


def test_watch_that_fails_with_an_empty_message_keeps_running() -> None:
    """A handled error class (OSError) with no message: before, the except handler itself
    raised IndexError and the watch thread ended."""
    calls: list[int] = []

    def list_fn(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise OSError()

    cache = _informer(list_fn)
    cache.start()
    try:
        _wait(lambda: len(calls) >= 2)
        assert cache.problem() is None
    finally:
        cache.stop()


def test_dead_watch_thread_is_reported() -> None:
    cache = _informer(_raising(RuntimeError("boom\nstack")))
    assert cache.problem() is None  # not started: nothing to report yet
    cache.start()
    try:
        _wait(lambda: cache.problem() is not None)
        assert cache.problem() == "thread watch-pods died: RuntimeError: boom"
    finally:
        cache.stop()
    assert cache.problem() is None  # stopped on purpose


def test_dead_lease_thread_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ControllerSettings(DB_HOST="db", DB_USER="u", NAMESPACE="ns", POD_NAME="me")
    elector = LeaseElector(settings, api=None)  # type: ignore[arg-type]

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # not an Exception: escapes the renewal's handler

    monkeypatch.setattr(elector, "_try", crash)
    elector.start(lambda: None)
    _wait(lambda: elector.problem() is not None)
    assert elector.problem() == "thread lease died: KeyboardInterrupt"
    assert not elector.is_leader()


def test_lease_renewal_error_with_empty_message_keeps_the_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = ControllerSettings(
        DB_HOST="db", DB_USER="u", NAMESPACE="ns", POD_NAME="me", LEASE_DURATION_SECONDS=1.5
    )
    elector = LeaseElector(settings, api=None)  # type: ignore[arg-type]
    calls: list[int] = []

    def fail(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise Silent()

    monkeypatch.setattr(elector, "_try", fail)
    elector.start(lambda: None)
    try:
        _wait(lambda: len(calls) >= 2)
        assert elector.problem() is None
    finally:
        monkeypatch.setattr(elector, "_try", lambda: False)
        elector.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except HTTPError as err:
        return err.code, err.read().decode()


def test_probes_fail_with_the_reason_of_a_dead_thread() -> None:
    health = Health(liveness_window=60)
    health.not_ready = None
    problems: list[str] = []
    health.add_check(lambda: problems[0] if problems else None)
    server = ProbeServer(0, Metrics(), health)
    server.start()
    try:
        assert _get(server.port, "/healthz") == (200, "ok\n")
        assert _get(server.port, "/readyz") == (200, "ok\n")
        problems.append("thread watch-pods died: IndexError: list index out of range")
        assert _get(server.port, "/healthz") == (503, f"{problems[0]}\n")
        assert _get(server.port, "/readyz") == (503, f"{problems[0]}\n")
    finally:
        server.stop()


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    stop = threading.Event()
    stop.set()  # every wait returns at once
    backoff = Backoff(first=0.5, cap=3.0)
    delays = []
    for _ in range(5):
        delays.append(backoff.delay)
        backoff.wait(stop)
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.delay == 0.5
