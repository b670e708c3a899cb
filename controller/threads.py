"""A daemon thread whose unexpected end the probes can see.

The watch caches, the lease and the LISTEN connection each run in a thread the service loop
depends on but never joins. Each loops "forever" and handles the errors it expects; one it
does not expect (a bug, an IndexError in a handler) used to end the thread with a traceback
on stderr while the loop kept going on a frozen cache or a lease it no longer renews, and
`/readyz` stayed 200. `problem()` turns such an end into a reason the probes report
(controller/metrics.py `Health`), so the pod is restarted instead of silently going stale.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dharma_common.errors import first_line

log = logging.getLogger(__name__)


class WatchedThread:
    def __init__(self, target: Callable[[], None], name: str) -> None:
        self.name = name
        self._target = target
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._started = False
        self._stopping = False
        self._error: str | None = None

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Mark the end as intended (no problem to report), then wait for it."""
        self._stopping = True
        if self._started:
            self._thread.join(timeout=timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def problem(self) -> str | None:
        """Why the thread is gone when it should be running, else None."""
        if not self._started or self._stopping or self._thread.is_alive():
            return None
        return f"thread {self.name} died: {self._error or 'it returned unexpectedly'}"

    def _main(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            # BaseException too: whatever ends the thread must be reported, not only errors.
            kind, message = type(exc).__name__, first_line(exc)
            self._error = kind if message == kind else f"{kind}: {message}"
            log.critical(
                "background thread died",
                exc_info=True,
                extra={"action": "thread_died", "thread_name": self.name, "error": self._error},
            )


class Backoff:
    """A capped exponential delay between retries of something that failed (a lost database,
    watch or LISTEN connection): `first`, twice that, ... up to `cap`; `reset()` after a
    success. One class, so every loop of the controller retries the same way."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap = first, cap
        #: The delay the next `wait` sleeps (what log lines report as `retry_in_seconds`).
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def wait(self, stop: threading.Event) -> None:
        """Sleep the current delay (less if `stop` is set meanwhile), then double it."""
        stop.wait(self.delay)
        self.delay = min(self.cap, self.delay * 2)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take` spends one if there is one.
    Used to rate-limit Normal Events (controller/events.py) and the service loop's passes
    (controller/service.py)."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self) -> bool:
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def delay(self) -> float:
        """Seconds until `take` would succeed: 0 when a token is there (never, at rate 0:
        infinity)."""
        self._refill()
        if self._tokens >= 1:
            return 0.0
        return (1 - self._tokens) / self._rate if self._rate > 0 else float("inf")
