"""The runner's one seam to WebDAV: streamed GET to a file, MKCOL, streamed PUT, and the
PROPFIND (Depth 1) and DELETE that remove an earlier run's HLS segments.

Transient failures (connection errors, timeouts, 5xx, 429) are retried with exponential
backoff; 401/403/404 and other client errors are permanent and say which path and what the
server answered. Bodies are streamed in chunks so a 20 GB upload never sits in memory.
Sessions are per thread because segment uploads run in parallel.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests
import urllib3
from requests.auth import HTTPBasicAuth
from tenacity import (
    RetryCallState,
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from jobrunner.errors import (
    BadMediaError,
    PermanentError,
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


_DIGITS = re.compile(r"[0-9]+")
#: The slowest download accepted, averaged over each HTTP_TIMEOUT_SECONDS: the timeout says
#: how long a server may be silent, this how little it may send (a 1 GB talk at this rate
#: takes 18 hours, so no honest server is near it).
MIN_BYTES_PER_SECOND = 16 * 1024

#: Scratch space an attempt needs per byte of source: the source itself, plus the HLS
#: segments and the MP4 (each about the source's size when re-encoded at its bitrate) and the
#: 16 kHz WAV, all on the same emptyDir at once: about 2-3x the source (issue 10, item 3).
#: 2.5 refuses the hopeless at once and still lets a talk of 40% of the scratch through.
SCRATCH_FACTOR = 2.5


def scratch_shortfall(declared: int, free: int) -> int | None:
    """Bytes missing for an attempt on a `declared`-byte source with `free` bytes of scratch
    (None if it fits)."""
    missing = math.ceil(declared * SCRATCH_FACTOR) - free
    return missing if missing > 0 else None


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


#: A PROPFIND asking only whether each member is a collection (RFC 4918 9.1).
_PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?>'
    b'<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/></D:prop></D:propfind>'
)
#: The largest PROPFIND answer read: an hls collection of a 10-hour talk in 1 s segments is
#: 36,000 members of a few hundred bytes each, well under this.
MAX_LISTING_BYTES = 64 * 1024 * 1024


def parse_listing(body: bytes, collection_path: str) -> list[str]:
    """The names of the non-collection members in a PROPFIND Depth 1 multistatus answer for
    the collection at `collection_path` (its URL path). The collection itself and
    sub-collections are left out. Hrefs may be absolute URLs or paths, percent-encoded (RFC
    4918 8.3). A document with a DTD is refused before parsing: without one there are no
    entities to expand or resolve, which is what makes parsing XML risky (a multistatus
    answer never needs one)."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise WebDAVPermanentError("WebDAV PROPFIND answer has a DTD; refused")
    try:
        root = ET.fromstring(body)  # noqa: S314 - no DTD, see above
    except ET.ParseError as exc:
        raise _Retryable(f"unreadable PROPFIND answer ({exc})") from None
    own = urllib.parse.unquote(collection_path).rstrip("/")
    names = []
    for response in root.iter("{DAV:}response"):
        href = response.findtext("{DAV:}href", default="").strip()
        path = urllib.parse.unquote(urllib.parse.urlsplit(href).path)
        if not path or path.rstrip("/") == own:
            continue
        if response.find(".//{DAV:}resourcetype/{DAV:}collection") is not None:
            continue
        if path.endswith("/"):
            continue
        names.append(path.rsplit("/", 1)[-1])
    return names


class _Retryable(Exception):
    """Internal: a failure worth another try; carries the final message if tries run out."""


def declared_length(values: list[str]) -> int | None:
    """The body length from every Content-Length header value, strictly: digits only (no
    sign, blank, `_` or letters, all of which int() or urllib3 let through), and the same
    number if repeated (RFC 9110 8.6). None when absent. A wrong length would make the size
    limit and the truncation check meaningless, so any other value is refused."""
    numbers = set()
    for value in values:
        for raw in value.split(","):
            part = raw.strip(" \t")
            if not _DIGITS.fullmatch(part):
                raise _Retryable(f"invalid Content-Length {value[:40]!r} from the server")
            numbers.add(int(part))
    if len(numbers) > 1:
        raise _Retryable(f"invalid Content-Length: differing values {sorted(numbers)}")
    return numbers.pop() if numbers else None


class _RateFloor:
    """A server that sends a byte now and then never trips the per-read timeout, and could
    hold a runner until its deadline: require `minimum` bytes/s over each `window` seconds
    (the client's timeout), so a try ends within about two timeouts of the last good data."""

    def __init__(self, minimum: int, window: float) -> None:
        self._minimum, self._window = minimum, window
        self._since, self._at = time.monotonic(), 0

    def check(self, size: int) -> None:
        elapsed = time.monotonic() - self._since
        if not self._minimum or elapsed < self._window:
            return
        got = size - self._at
        if got < self._minimum * elapsed:
            raise _Retryable(
                f"download too slow: {got:,} bytes in {elapsed:.0f} s, under the minimum of "
                f"{self._minimum:,} bytes/s over each HTTP_TIMEOUT_SECONDS"
            )
        self._since, self._at = time.monotonic(), size


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
        min_rate: int = MIN_BYTES_PER_SECOND,
    ) -> None:
        self._base = base_url.rstrip("/")
        # UTF-8 bytes (RFC 7617): requests encodes text credentials as Latin-1, and the
        # UnicodeEncodeError for a password such as "密碼" quoted one of its characters.
        self._auth = HTTPBasicAuth(user.encode("utf-8"), password.encode("utf-8")) if user else None
        self._timeout = timeout
        self._min_rate = min_rate
        self._retries = retries
        self._backoff = backoff
        self._local = threading.local()

    # -- plumbing -------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.auth = self._auth
            # Byte counts (the size limit, the Content-Length check) must be of the file.
            session.headers["Accept-Encoding"] = "identity"
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
                extra={
                    "action": "webdav_retry",
                    "operation": what,
                    "try": state.attempt_number,
                    "error": str(exc),
                },
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
        except requests.exceptions.InvalidHeader as exc:  # e.g. urllib3's differing lengths
            header = "Content-Length" if "Content-Length" in str(exc) else "header"
            raise _Retryable(f"invalid {header} from {self._base}") from None

    # -- operations -----------------------------------------------------------------------

    def download(
        self,
        segments: list[str],
        dest: Path,
        max_bytes: int,
        *,
        free_bytes: Callable[[Path], int] = _free_bytes,
    ) -> int:
        """Stream a file to `dest`; returns its size. Refuses files over `max_bytes`, and
        files whose declared size times SCRATCH_FACTOR exceeds the free space where `dest`
        lives — before writing a byte, so the attempt fails permanently with both sizes
        instead of being evicted by the kubelet half-way (exit 137, retried, downloaded
        again). `free_bytes` (shutil.disk_usage by default) is a parameter because a unit
        test cannot make a real filesystem of a chosen size."""
        what = f"GET {url_path(segments)}"

        def attempt() -> int:
            response = self._request("GET", segments, stream=True)
            with response:
                self._check(response, what, (200,))
                declared = self._declared(response)
                if declared is not None and declared > max_bytes:
                    raise BadMediaError(
                        f"source {url_path(segments)} is {declared:,} bytes, over the "
                        f"limit of {max_bytes:,} (MAX_SOURCE_BYTES)"
                    )
                if declared is not None:
                    self._check_room(url_path(segments), declared, dest, free_bytes)
                size = self._receive(response, dest, max_bytes, url_path(segments))
                if declared is not None and size != declared:
                    raise _Retryable(f"download ended at {size:,} of {declared:,} bytes")
                return size

        return self._call(what, attempt)

    @staticmethod
    def _check_room(
        name: str, declared: int, dest: Path, free_bytes: Callable[[Path], int]
    ) -> None:
        """A partial file from an earlier try is about to be overwritten: its bytes count as
        free."""
        free = free_bytes(dest.parent) + (dest.stat().st_size if dest.exists() else 0)
        missing = scratch_shortfall(declared, free)
        if missing is not None:
            raise PermanentError(
                f"source {name} is {declared:,} bytes; processing it needs about "
                f"{math.ceil(declared * SCRATCH_FACTOR):,} bytes of scratch space "
                f"({SCRATCH_FACTOR}x) but {dest.parent} has {free:,} bytes free "
                "(raise RUNNER_SCRATCH_SIZE)"
            )

    @staticmethod
    def _declared(response: requests.Response) -> int | None:
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _Retryable(f"the server sent a {encoding[:20]!r}-encoded body, not the file")
        return declared_length(response.raw.headers.getlist("Content-Length"))

    def _receive(self, response: requests.Response, dest: Path, max_bytes: int, name: str) -> int:
        """Copy the body as it arrives (`read1`: whatever the socket has, so the rate floor
        is checked between reads even when the server sends one byte at a time)."""
        size, floor = 0, _RateFloor(self._min_rate, self._timeout)
        try:
            with dest.open("wb") as out:
                while chunk := response.raw.read1(_CHUNK, decode_content=False):
                    size += len(chunk)
                    if size > max_bytes:
                        raise BadMediaError(
                            f"source {name} is over the limit of {max_bytes:,} bytes "
                            "(MAX_SOURCE_BYTES)"
                        )
                    out.write(chunk)
                    floor.check(size)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise _Retryable(
                f"download interrupted after {size:,} bytes ({type(exc).__name__})"
            ) from None
        return size

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

    def list_files(self, segments: list[str]) -> list[str]:
        """The file names directly in the collection `segments` (PROPFIND Depth 1); an empty
        list if the collection does not exist."""
        what = f"PROPFIND {url_path(segments)}/"

        def attempt() -> list[str]:
            response = self._request(
                "PROPFIND",
                [*segments, ""],
                data=_PROPFIND_BODY,
                headers={"Depth": "1", "Content-Type": 'application/xml; charset="utf-8"'},
                stream=True,
            )
            with response:
                if response.status_code == 404:
                    return []
                self._check(response, what, (207,))
                try:
                    body = response.raw.read(MAX_LISTING_BYTES + 1, decode_content=True)
                except (urllib3.exceptions.HTTPError, OSError) as exc:
                    raise _Retryable(f"listing interrupted ({type(exc).__name__})") from None
                if len(body) > MAX_LISTING_BYTES:
                    raise WebDAVPermanentError(
                        f"WebDAV {what}: answer over {MAX_LISTING_BYTES:,} bytes"
                    )
            return parse_listing(body, urllib.parse.urlsplit(self.url(segments)).path)

        return self._call(what, attempt)

    def delete(self, segments: list[str], *, before: Callable[[], None] | None = None) -> None:
        """Delete a file; one already gone (404) is fine. `before` runs before every try (the
        caller's fence check: a delete must never be sent for an attempt that lost its
        row, not even a retried one)."""
        what = f"DELETE {url_path(segments)}"

        def attempt() -> None:
            if before is not None:
                before()
            response = self._request("DELETE", segments)
            with response:
                self._check(response, what, (200, 202, 204, 404))

        self._call(what, attempt)
