"""controller/wire.py: managedFields cut from raw API bytes, exactly or not at all, and watch
lines split as bytes whatever the chunking."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from controller import wire

MANAGED = [
    {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
     "time": "2026-12-01T02:00:00Z", "fieldsType": "FieldsV1",
     "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:job-name": {}}},
                  "f:spec": {"f:containers": {'k:{"name":"runner"}': {".": {}}}}}},
    {"manager": "kwok", "operation": "Update", "apiVersion": "v1",
     "time": "2026-12-01T02:00:01Z", "fieldsType": "FieldsV1",
     "fieldsV1": {"f:status": {"f:phase": {}}}, "subresource": "status"},
]  # fmt: skip


def pod(**meta: Any) -> dict[str, Any]:
    """A pod as the API server writes it: managedFields last in metadata, spec after."""
    metadata = {"name": "dharma-stt-1-1-abcde", "namespace": "ns", "resourceVersion": "42",
                "labels": {"job-name": "dharma-stt-1-1"}, **meta}  # fmt: skip
    spec, status = {"containers": [{"name": "runner"}]}, {"phase": "Running"}
    return {"kind": "Pod", "apiVersion": "v1", "metadata": metadata, "spec": spec, "status": status}


def raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def without(obj: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def test_the_array_is_cut_and_nothing_else() -> None:
    obj = pod(managedFields=MANAGED)
    cut = wire.without_managed_fields(raw(obj))
    assert b"managedFields" not in cut
    assert json.loads(cut) == without(obj)


def test_a_watch_event_and_a_list_lose_every_array() -> None:
    obj = pod(managedFields=MANAGED)
    assert wire.loads(raw({"type": "MODIFIED", "object": obj})) == {
        "type": "MODIFIED",
        "object": without(obj),
    }
    items = [pod(managedFields=MANAGED), pod(), pod(managedFields=MANAGED[:1])]
    listing = {"kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items}
    assert wire.loads(raw(listing))["items"] == [without(o) for o in items]


def test_bytes_without_the_array_are_returned_as_they_are() -> None:
    data = raw(pod())
    assert wire.without_managed_fields(data) is data


@pytest.mark.parametrize(
    "field_key",
    [
        'k:{"name":"A}]}"}',  # a name holding the bytes that end the array, then "}"
        'k:{"name":"A}],"}',  # ... then ","
        'f:x}]},"spec":{',  # the whole closing sequence, escaped inside a string
    ],
)
def test_a_name_inside_the_array_that_looks_like_its_end_never_loses_data(field_key: str) -> None:
    """A field key inside fieldsV1 is a string and may hold anything: a cut that would end
    inside it is unbalanced and refused, or fails to parse and falls back to the whole."""
    entry = {**MANAGED[0], "fieldsV1": {field_key: {}}}
    obj = pod(managedFields=[entry, MANAGED[1]])
    parsed = wire.loads(raw(obj))
    assert parsed["metadata"].get("managedFields") in (None, [entry, MANAGED[1]])
    assert {k: v for k, v in parsed.items() if k != "metadata"} == {
        k: v for k, v in obj.items() if k != "metadata"
    }
    assert without(parsed) == without(obj)


def test_metadata_after_the_array_is_kept() -> None:
    """Were the API server ever to write a field after managedFields, it must survive."""
    data = raw(pod(managedFields=MANAGED)).replace(b']},"spec"', b'],"finalizers":["x"]},"spec"')
    assert wire.loads(data)["metadata"]["finalizers"] == ["x"]


class Chunked:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: None, decode_content: bool) -> Iterator[bytes]:
        yield from self.chunks


@pytest.mark.parametrize(
    "chunks",
    [
        [b'{"a":1}\n{"b":2}\n'],
        [b'{"a"', b":1}\n", b'{"b":2}', b"\n"],
        [b'{"a":1}\n\n{"b":2}\n'],  # an empty line is passed on (the informer skips it)
    ],
)
def test_lines_are_whole_whatever_the_chunking(chunks: list[bytes]) -> None:
    lines = [line for line in wire.lines(Chunked(chunks)) if line]
    assert [json.loads(line) for line in lines] == [{"a": 1}, {"b": 2}]


class Waits(threading.Event):
    """A stop event that records the waits asked of it (and never waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.asked.append(timeout or 0.0)
        return False


@pytest.mark.parametrize("pending", [False, True])
def test_a_watch_settles_only_when_nothing_more_is_waiting(pending: bool) -> None:
    """After a chunk, `lines` waits `settle` before reading on only when the socket has
    nothing more (a steady stream is then read in batches); with bytes waiting it reads on.
    A real socket pair stands in for the API server's connection."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        if pending:
            theirs.sendall(b"more")
        response = Chunked([b'{"a":1}\n', b'{"b":2}\n'])
        response.connection = SimpleNamespace(sock=ours)  # type: ignore[attr-defined]
        stop = Waits()
        lines = list(wire.lines(response, settle=0.05, stop=stop))
    assert [json.loads(line) for line in lines] == [{"a": 1}, {"b": 2}]
    assert stop.asked == ([] if pending else [0.05, 0.05])
