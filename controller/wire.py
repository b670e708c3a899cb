"""Reading the API server's JSON cheaply: watch lines as bytes, and objects without their
`metadata.managedFields`.

Why: at a steady 20 Jobs/s the controller reads ten watch events per Job (its pod: ADDED,
scheduled, Running, and leaving the watch when it Succeeds; its Job: ADDED, active,
SuccessCriteriaMet, Complete, deleting, DELETED), ~6 KB each, and nearly half of every
event's bytes — and more of its small JSON values — are `managedFields` (server-side apply's
bookkeeping), which nothing here reads. Cutting that array out of the raw bytes before parsing
is cheaper than building it as Python objects and throwing it away (docs/performance.md,
"Steady-state CPU").

The cut is exact, not a guess: the API server writes `managedFields` as an array of flat
entries (manager, operation, apiVersion, time, fieldsType, fieldsV1, subresource) with no
array inside them, so the array ends at the first `}]` followed by the end of `metadata` or
its next key. A name that itself contains such bytes (a field key inside `fieldsV1` is a
string and may hold anything) would leave unbalanced braces or brackets: every cut is
checked for balance, and any doubt — or a parse that fails after cutting — falls back to
parsing the original bytes whole.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson

_START = b',"managedFields":['
_END = b"}]"


def without_managed_fields(raw: bytes) -> bytes:
    """`raw` with every `,"managedFields":[...]` cut out (a list response has one per item)."""
    parts: list[bytes] = []
    done = 0
    start = raw.find(_START)
    while start >= 0:
        end = _array_end(raw, start + len(_START) - 1)
        if end < 0:
            break
        parts.append(raw[done:start])
        done = end + 1
        start = raw.find(_START, done)
    if not parts:
        return raw
    parts.append(raw[done:])
    return b"".join(parts)


def _array_end(raw: bytes, opening: int) -> int:
    """Index of the `]` closing the managedFields array opened at `opening`, or -1."""
    end = raw.find(_END, opening)
    while end >= 0:
        after = raw[end + 2 : end + 4]
        if after[:1] == b"}" or after == b',"':
            close = end + 1
            balanced = raw.count(b"{", opening, close) == raw.count(b"}", opening, close)
            # The opening "[" is inside the span, the closing "]" just after it.
            brackets = raw.count(b"[", opening, close) == raw.count(b"]", opening, close) + 1
            return close if balanced and brackets else -1
        end = raw.find(_END, end + 1)
    return -1


def loads(raw: bytes) -> Any:
    """Parse an API response or watch line, skipping `managedFields` when it can be cut."""
    trimmed = without_managed_fields(raw)
    if trimmed is raw:
        return orjson.loads(raw)
    try:
        return orjson.loads(trimmed)
    except orjson.JSONDecodeError:
        return orjson.loads(raw)


def lines(
    response: Any, settle: float = 0.0, stop: threading.Event | None = None
) -> Iterator[bytes]:
    """The newline-separated lines of a streamed response (a watch), as bytes: the parser
    takes bytes, so nothing is decoded to text and back (the client's `iter_resp_lines`
    decodes each line to str).

    `settle`: once a chunk's lines are handled and nothing more is waiting (in the TLS layer
    or on the socket), wait this long (or until `stop`) before reading on. A steady stream
    then wakes the reading thread once per batch of events rather than once per event: at 20
    Jobs/s each event alone costs ~40 µs to handle but 100 to 140 µs in the controller, the rest
    being the thread's wake-up and its turn at the interpreter (docs/performance.md). Bytes
    that http.client has already buffered are not seen by this check: then the wait is only
    a delay, never a lost line."""
    sock = _socket_of(response) if settle > 0 else None
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer = buffer + chunk if buffer else chunk
        start = 0
        newline = buffer.find(b"\n")
        while newline >= 0:
            yield buffer[start:newline]
            start = newline + 1
            newline = buffer.find(b"\n", start)
        buffer = buffer[start:]
        if sock is not None and _nothing_waiting(sock):
            if stop is not None:
                stop.wait(settle)
            else:
                time.sleep(settle)


def _socket_of(response: Any) -> socket.socket | None:
    sock = getattr(getattr(response, "connection", None), "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _nothing_waiting(sock: socket.socket) -> bool:
    """Neither decrypted bytes in the TLS layer nor bytes on the socket (any doubt: False)."""
    try:
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
