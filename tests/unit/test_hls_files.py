"""Issue 10, defect 11, the pure parts: HLS segment names unique per attempt, the playlist's
references, which names in the hls collection an earlier run left, and reading a PROPFIND
Depth 1 answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobrunner.errors import WebDAVPermanentError
from jobrunner.plan import (
    EncodeOptions,
    Workspace,
    make_plan,
    playlist_segments,
    run_name,
    stale_segments,
)
from jobrunner.probe import AudioStream, MediaInfo, VideoStream
from jobrunner.webdav import parse_listing

INFO = MediaInfo(
    format_name="mov,mp4,m4a,3gp,3g2,mj2",
    duration=60.0,
    video=VideoStream(index=0, codec="h264", pix_fmt="yuv420p", width=640, height=360),
    audio=AudioStream(index=1, codec="aac", channels=2),
)


def _segment_pattern(cmd: list[str]) -> str:
    return cmd[cmd.index("-hls_segment_filename") + 1]


def test_segments_are_named_after_the_attempt() -> None:
    """Two runs never write the same segment name: job and attempt are in it."""
    first = make_plan(INFO, Workspace(Path("/s"), ".mp4", run_name(42, 1)), EncodeOptions())
    second = make_plan(INFO, Workspace(Path("/s"), ".mp4", run_name(42, 2)), EncodeOptions())
    other_job = make_plan(INFO, Workspace(Path("/s"), ".mp4", run_name(43, 1)), EncodeOptions())
    assert _segment_pattern(first.package) == "/s/hls/j42-a1-%05d.ts"
    patterns = {_segment_pattern(p.package) for p in (first, second, other_job)}
    assert len(patterns) == 3
    assert "/s/hls/playlist.m3u8" in first.package  # the playlist's name stays the contract's


def test_audio_only_segments_are_named_after_the_attempt_too() -> None:
    info = MediaInfo(
        format_name="mov,mp4,m4a,3gp,3g2,mj2", duration=60.0, video=None, audio=INFO.audio
    )
    plan = make_plan(info, Workspace(Path("/s"), ".m4a", run_name(7, 3)), EncodeOptions())
    assert _segment_pattern(plan.package) == "/s/hls/j7-a3-%05d.ts"


PLAYLIST = """#EXTM3U
#EXT-X-VERSION:3
#EXT-X-TARGETDURATION:6
#EXT-X-MEDIA-SEQUENCE:0
#EXT-X-PLAYLIST-TYPE:VOD
#EXTINF:6.000000,
j42-a2-00000.ts
#EXTINF:6.000000,

j42-a2-00001.ts
#EXTINF:1.500000,
j42-a2-00002.ts
#EXT-X-ENDLIST
"""


def test_playlist_segments_are_its_uri_lines_in_order() -> None:
    assert playlist_segments(PLAYLIST) == ["j42-a2-00000.ts", "j42-a2-00001.ts", "j42-a2-00002.ts"]
    assert playlist_segments("#EXTM3U\n#EXT-X-ENDLIST\n") == []


def test_stale_segments_are_the_unreferenced_ts_files() -> None:
    listing = [
        "playlist.m3u8",
        "j42-a2-00000.ts",
        "j42-a2-00001.ts",
        "j42-a2-00002.ts",
        "j42-a1-00000.ts",  # the attempt before
        "j42-a1-00003.ts",  # ... which had more segments
        "segment00000.ts",  # the naming before issue 10, defect 11
        "j41-a1-00000.ts",  # another job of the media
        "notes.txt",  # not ours: left alone
    ]
    assert stale_segments(listing, playlist_segments(PLAYLIST)) == [
        "j41-a1-00000.ts",
        "j42-a1-00000.ts",
        "j42-a1-00003.ts",
        "segment00000.ts",
    ]
    assert stale_segments(["playlist.m3u8", "j1-a1-00000.ts"], ["j1-a1-00000.ts"]) == []


def _multistatus(*responses: tuple[str, bool]) -> bytes:
    parts = [
        f"<d:response><d:href>{href}</d:href><d:propstat><d:prop><d:resourcetype>"
        f"{'<d:collection/>' if collection else ''}</d:resourcetype></d:prop>"
        "<d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response>"
        for href, collection in responses
    ]
    return (
        '<?xml version="1.0" encoding="utf-8"?><d:multistatus xmlns:d="DAV:">'
        + "".join(parts)
        + "</d:multistatus>"
    ).encode()


def test_parse_listing_gives_the_member_files_by_name() -> None:
    """Paths or absolute URLs, percent-encoded; the collection itself and sub-collections
    are not files."""
    body = _multistatus(
        ("/dav/talks/2510/m/hls/", True),
        ("/dav/talks/2510/m/hls/j1-a1-00000.ts", False),
        ("http://dav.example:8080/dav/talks/2510/m/hls/j1-a1-00001.ts", False),
        ("/dav/talks/2510/m/hls/odd%20name%23.ts", False),
        ("/dav/talks/2510/m/hls/playlist.m3u8", False),
        ("/dav/talks/2510/m/hls/sub/", True),
    )
    assert parse_listing(body, "/dav/talks/2510/m/hls") == [
        "j1-a1-00000.ts",
        "j1-a1-00001.ts",
        "odd name#.ts",
        "playlist.m3u8",
    ]


def test_parse_listing_refuses_a_dtd() -> None:
    body = (
        b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY a "aaaa">]>'
        b'<d:multistatus xmlns:d="DAV:"><d:response><d:href>/x/&a;.ts</d:href>'
        b"</d:response></d:multistatus>"
    )
    with pytest.raises(WebDAVPermanentError, match="DTD"):
        parse_listing(body, "/x")
