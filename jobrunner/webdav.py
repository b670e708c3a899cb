"""The runner's one seam to WebDAV: streamed GET to a file, MKCOL, streamed PUT.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential
backoff; 401/403/404 and other client errors are permanent and say which path and what the
server answered. Bodies are streamed in chunks so a 20 GB upload never sits in memory.
Sessions are per thread because segment uploads run in parallel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from jobrunner.errors import (
    BadMediaError,
    WebDAVPermanentError,
    WebDAVTemporaryError,
)
from jobrunner.paths import url_path

log = logging.getLogger(__name__)

T = TypeVar("T")
_CHUNK = 1024 * 1024
_STATUS_WORDS = {
    401: "authentication failed (check WEBDAV_USER/WEBDAV_PASSWORD)",
    403: "access forbidden for this account",
    404: "not found",
    405: "method not allowed",
    409: "conflict (a parent collection is missing)",
    413: "rejected as too large by the server",
    507: "server out of storage",
}


class _Retryable(Exception):
    """Internal: a failure worth another try; carries the final message if tries run out."""


class WebDAVClient:
    """A small WebDAV client bound to one base URL and account."""

    def __init__(
        self,
        base_url: str,
        user: str,
        password: str,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 1.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._auth = (user, password) if user else None
        self._timeout = timeout
        self._retries = retries
        self._backoff = backoff
        self._local = threading.local()

    # -- plumbing -------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            self._local.session = session
        return session

    def url(self, segments: list[str]) -> str:
        return self._base + url_path(segments)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` with retries on `_Retryable`; turn exhausted retries into a temporary
        error naming the operation."""

        def _log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "webdav retry",
                extra={"operation": what, "try": state.attempt_number, "error": str(exc)},
            )

        runner = retry(
            retry=retry_if_exception_type(_Retryable),
            stop=stop_after_attempt(self._retries),
            wait=wait_exponential_jitter(initial=self._backoff, max=30 * self._backoff + 0.01),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return runner(fn)()
        except _Retryable as exc:
            raise WebDAVTemporaryError(
                f"WebDAV {what} failed after {self._retries} tries: {exc}"
            ) from None

    def _check(self, response: requests.Response, what: str, ok: tuple[int, ...]) -> None:
        status = response.status_code
        if status in ok:
            return
        words = _STATUS_WORDS.get(status, response.reason or "error")
        message = f"WebDAV {what}: HTTP {status} {words}"
        if status in (408, 425, 429) or status >= 500:
            raise _Retryable(message)
        raise WebDAVPermanentError(message)

    def _request(self, method: str, segments: list[str], **kwargs: object) -> requests.Response:
        try:
            return self._session().request(
                method,
                self.url(segments),
                timeout=self._timeout,
                **kwargs,  # type: ignore[arg-type]
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(f"{type(exc).__name__} talking to {self._base}") from exc

    # -- operations -----------------------------------------------------------------------

    def download(self, segments: list[str], dest: Path, max_bytes: int) -> int:
        """Stream a file to `dest`; returns its size. Refuses files over `max_bytes`."""
        what = f"GET {url_path(segments)}"

        def attempt() -> int:
            response = self._request("GET", segments, stream=True)
            with response:
                self._check(response, what, (200,))
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise BadMediaError(
                        f"source {url_path(segments)} is {int(declared):,} bytes, over the "
                        f"limit of {max_bytes:,} (MAX_SOURCE_BYTES)"
                    )
                size = 0
                try:
                    with dest.open("wb") as out:
                        for chunk in response.iter_content(_CHUNK):
                            size += len(chunk)
                            if size > max_bytes:
                                raise BadMediaError(
                                    f"source {url_path(segments)} is over the limit of "
                                    f"{max_bytes:,} bytes (MAX_SOURCE_BYTES)"
                                )
                            out.write(chunk)
                except (requests.ConnectionError, requests.Timeout) as exc:
                    raise _Retryable(f"download interrupted after {size:,} bytes") from exc
                except requests.exceptions.ChunkedEncodingError as exc:
                    raise _Retryable(f"download interrupted after {size:,} bytes") from exc
                if declared is not None and declared.isdigit() and size != int(declared):
                    raise _Retryable(f"download ended at {size:,} of {int(declared):,} bytes")
                return size

        return self._call(what, attempt)

    def mkcol(self, segments: list[str]) -> None:
        """Create a collection; an existing one (405, or 301 on some servers) is fine."""
        what = f"MKCOL {url_path(segments)}/"

        def attempt() -> None:
            response = self._request("MKCOL", segments)
            with response:
                self._check(response, what, (200, 201, 204, 301, 405))

        self._call(what, attempt)

    def put(self, local: Path, segments: list[str]) -> None:
        """Stream a local file to `segments` (the file is reopened for each try)."""
        what = f"PUT {url_path(segments)}"
        size = local.stat().st_size

        def attempt() -> None:
            with local.open("rb") as body:
                response = self._request(
                    "PUT", segments, data=body, headers={"Content-Length": str(size)}
                )
            with response:
                self._check(response, what, (200, 201, 204))

        self._call(what, attempt)
