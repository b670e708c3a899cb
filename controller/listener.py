"""LISTEN on `dharma_stt_jobs`: the wake-up hint that makes claims immediate.

The migration's statement-level trigger NOTIFYs once per transaction that makes a row
pending or cancelled. A notification is only a hint — polling (POLL_INTERVAL_SECONDS) is the
safety net — so this thread needs no bookkeeping: on any notification, and after every
(re)connect (notifications sent while disconnected are lost), it calls `wake()`.

LISTEN needs a session of its own that stays open: a direct or session-mode connection
(Supabase's transaction pooler drops NOTIFY). It runs in autocommit so it never holds a
transaction. When PostgreSQL restarts, the thread reconnects with capped exponential backoff.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from collections.abc import Callable
from typing import Any

import psycopg2

from controller.threads import Backoff, WatchedThread
from dharma_common.errors import first_line
from dharma_common.settings import DatabaseSettings

CHANNEL = "dharma_stt_jobs"
log = logging.getLogger(__name__)


class Listener:
    """A daemon thread holding one LISTEN connection (the loop's `WakeSource`)."""

    def __init__(
        self,
        settings: DatabaseSettings,
        application_name: str,
        max_backoff: float = 10.0,
    ) -> None:
        self._settings = settings
        self._wake: Callable[[], None] = lambda: None
        self._application_name = application_name
        self._max_backoff = max_backoff
        self._stop = threading.Event()
        self._thread = WatchedThread(self._run, "listen")

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.stop(timeout=5)

    def problem(self) -> str | None:
        """Why notifications no longer arrive (the LISTEN thread died), else None."""
        return self._thread.problem()

    def _run(self) -> None:
        backoff = Backoff(first=0.2, cap=self._max_backoff)
        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = psycopg2.connect(**self._settings.connect_kwargs(self._application_name))
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {CHANNEL}")
                log.info(
                    "listening for notifications", extra={"action": "listening", "channel": CHANNEL}
                )
                backoff.reset()
                self._wake()  # anything sent while we were away is lost: look now
                self._listen(conn)
            except psycopg2.Error as exc:
                log.warning(
                    "LISTEN connection lost; reconnecting",
                    extra={
                        "action": "listen_lost",
                        "error": first_line(exc),
                        "retry_in_seconds": round(backoff.delay, 2),
                    },
                )
                backoff.wait(self._stop)
            finally:
                if conn is not None:
                    with contextlib.suppress(psycopg2.Error):
                        conn.close()

    def _listen(self, conn: Any) -> None:
        while not self._stop.is_set():
            # A short select timeout bounds how long stop() waits; the keepalives configured
            # in connect_kwargs notice a vanished server.
            ready, _, _ = select.select([conn], [], [], 1.0)
            if not ready:
                continue
            conn.poll()
            if conn.notifies:
                conn.notifies.clear()
                self._wake()
