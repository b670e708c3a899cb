"""`dharma-controller run`: wire settings, executor, leader election and signals together.

Everything that can be checked before serving is checked here, so a misconfigured
Deployment fails at once with a message naming the variable (exit status 2) instead of
crash-looping later.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from types import FrameType

from controller.executor import Executor
from controller.faults import FaultHooks
from controller.metrics import Metrics
from controller.service import Leadership, Service
from controller.settings import ControllerSettings
from dharma_common.logs import configure_logging
from dharma_common.settings import ConfigError, load_settings

log = logging.getLogger("controller")


def _fail(message: str) -> int:
    log.error("configuration error: %s", message, extra={"action": "config_error"})
    print(f"dharma-controller: configuration error: {message}", file=sys.stderr)
    return 2


#: glibc mallopt parameter M_ARENA_MAX (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, unless MALLOC_ARENA_MAX already says how many.

    Why: glibc gives each thread that allocates concurrently an arena of its own, and memory
    freed in one is not returned to the others. The controller's Job-creation pool
    (LAUNCH_CONCURRENCY threads) and watch threads each grew one while a claimed batch was
    launched: +34 MB RSS in one burst of 200 creates (bench/controller.py), against an RSS
    target of 150 MB. Two arenas are plenty for a service whose threads mostly wait on I/O.
    Best effort: not glibc (musl, macOS), or no mallopt, means nothing to do.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


def run_service(executor_name: str | None, exit_when_idle: bool) -> int:
    overrides = {"EXECUTOR": executor_name} if executor_name else {}
    try:
        settings = load_settings(ControllerSettings, **overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    configure_logging(settings.LOG_LEVEL)
    limit_malloc_arenas()  # before the executor starts its threads
    leader: Leadership | None = None
    metrics = Metrics()
    if settings.STATUS_PAGE_ENABLED:
        if not settings.METRICS_PORT:
            return _fail("STATUS_PAGE_ENABLED=true needs METRICS_PORT (the page is served there)")
        from controller.status_page import PATH, StatusPage

        metrics.pages[PATH] = StatusPage(settings).page
    faults = FaultHooks.from_environment()  # None in production
    executor: Executor
    if settings.EXECUTOR == "local":
        if settings.LEADER_ELECTION:
            return _fail(
                "LEADER_ELECTION=true needs EXECUTOR=kubernetes (local controllers each run "
                "their own children and share the queue without a leader)"
            )
        from controller.local import LocalExecutor

        executor = LocalExecutor(settings, faults)
    else:
        from controller.kube import KubernetesExecutor, load_api_client

        try:
            api = load_api_client(settings.LAUNCH_CONCURRENCY)
        except ConfigError as exc:
            return _fail(str(exc))
        executor = KubernetesExecutor(settings, api, metrics)
        if settings.LEADER_ELECTION:
            from controller.lease import LeaseElector

            leader = LeaseElector(settings, api)
    service = Service(
        settings,
        executor,
        leader=leader,
        exit_when_idle=exit_when_idle,
        metrics=metrics,
        faults=faults,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info(
            "signal received; stopping",
            extra={"action": "signal_received", "signal": signal.Signals(signum).name},
        )
        service.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return service.run()
