"""Fast tests of the runner's pure pieces: path validation, the encode plan, subtitle
cleaning and WebVTT, settings errors, and the termination-message contract."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest

from dharma_common.contract import ErrorClass, ExitCode, classify_exit_code, one_line
from dharma_common.settings import ConfigError, load_settings
from jobrunner.errors import BadMediaError, PermanentError
from jobrunner.paths import ArtifactLayout, dav_segments, source_extension, url_path
from jobrunner.plan import EncodeOptions, Workspace, bits_per_second, make_plan
from jobrunner.probe import AudioStream, MediaInfo, VideoStream, check_usable, parse_probe
from jobrunner.settings import RunnerSettings
from jobrunner.subtitles import Segment, clean_segments, decode_segments, render_webvtt


@pytest.mark.parametrize(
    "bad",
    ["../etc", "a/../../b", "/", "", "a//b", "x\x00y", "dir\\file", "./a", "line\nbreak"],
)
def test_dav_segments_rejects_unsafe_paths(bad: str) -> None:
    with pytest.raises(PermanentError):
        dav_segments(bad)


def test_dav_segments_keeps_odd_but_safe_names() -> None:
    segments = dav_segments("/uploads/-rf 'talk' \"x\" #1?.mp4")
    assert segments == ["uploads", "-rf 'talk' \"x\" #1?.mp4"]
    assert url_path(segments) == "/uploads/-rf%20%27talk%27%20%22x%22%20%231%3F.mp4"


@pytest.mark.parametrize("bad", ["..", ".", "-x", "a/b", "", "a" * 65, "kat zen", "é"])
def test_category_must_be_one_safe_segment(bad: str) -> None:
    with pytest.raises(PermanentError, match="category_id"):
        ArtifactLayout.for_media(bad, dt.datetime.now(dt.timezone.utc), uuid.uuid4())


def test_layout_uses_created_at_in_utc() -> None:
    media = uuid.uuid4()
    # 00:30 on 1 Nov in UTC+2 is still October in UTC.
    created = dt.datetime(2025, 11, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    layout = ArtifactLayout.for_media("talks", created, media)
    assert layout.file("video.mp4") == ["talks", "2510", str(media), "video.mp4"]
    assert layout.collections()[-1] == ["talks", "2510", str(media), "hls"]


def test_source_extension_only_plain() -> None:
    assert source_extension("/a/b/Talk.MP4") == ".mp4"
    assert source_extension("/a/b/talk") == ""
    assert source_extension("/a/b/x.$(rm -rf)") == ""


def _info(vcodec: str | None, pix: str = "yuv420p", acodec: str | None = "aac") -> MediaInfo:
    video = VideoStream(0, vcodec, pix, 1280, 720) if vcodec else None
    audio = AudioStream(1, acodec, 2) if acodec else None
    return MediaInfo("mov,mp4", 60.0, video, audio)


def test_plan_copies_h264_aac() -> None:
    plan = make_plan(_info("h264"), Workspace(Path("/s"), ".mp4"), EncodeOptions())
    assert plan.copy_video and plan.copy_audio
    assert "libx264" not in plan.main and "aac" not in plan.main
    assert plan.main[plan.main.index("-c:v") + 1] == "copy"
    assert plan.pcm is not None and "16000" in plan.pcm
    # HLS and M4A come from the MP4 by stream copy, never a second encode.
    assert "libx264" not in plan.package and plan.package.count("copy") == 2


def test_plan_encodes_vp9_once_with_aligned_keyframes() -> None:
    opts = EncodeOptions(bitrate="1500k", shard_seconds=4)
    plan = make_plan(_info("vp9", acodec="opus"), Workspace(Path("/s")), opts)
    assert plan.main.count("libx264") == 1 and plan.copy_video is False
    assert "expr:gte(t,n_forced*4)" in plan.main
    assert plan.main[plan.main.index("-b:v") + 1] == "1500000"
    assert plan.main[plan.main.index("-c:a") + 1] == "aac"
    assert "libx264" not in plan.package


@pytest.mark.parametrize("pix", ["yuv420p10le", "yuv444p", "yuv422p"])
def test_plan_reencodes_h264_that_browsers_cannot_play(pix: str) -> None:
    plan = make_plan(_info("h264", pix=pix), Workspace(Path("/s")), EncodeOptions())
    assert plan.copy_video is False and "yuv420p" in plan.main


def test_plan_audio_only_has_no_mp4() -> None:
    plan = make_plan(_info(None, acodec="mp3"), Workspace(Path("/s")), EncodeOptions())
    assert not any(str(p).endswith("video.mp4") for p in plan.outputs)
    assert plan.main[-1].endswith("audio.m4a")


def test_plan_video_only_has_no_audio_work() -> None:
    plan = make_plan(_info("h264", acodec=None), Workspace(Path("/s")), EncodeOptions())
    assert plan.pcm is None and "0:a" not in plan.package


def test_paths_never_come_from_data() -> None:
    plan = make_plan(_info("h264"), Workspace(Path("/s"), ".mp4"), EncodeOptions())
    assert "/s/source.mp4" in plan.main
    for cmd in (plan.main, plan.package, plan.pcm or []):
        assert cmd[0] == "ffmpeg"
        paths = [arg for arg in cmd if "/" in arg and not arg.startswith(("expr:", "scale="))]
        assert paths and all(arg.startswith("/s/") for arg in paths), paths


def test_bits_per_second() -> None:
    assert bits_per_second("2000k") == 2_000_000
    assert bits_per_second("2M") == 2_000_000
    with pytest.raises(ValueError):
        bits_per_second("fast")


def test_parse_probe_ignores_cover_art() -> None:
    data = {
        "format": {"format_name": "mp3", "duration": "11.0"},
        "streams": [
            {"index": 0, "codec_type": "audio", "codec_name": "mp3", "channels": 1},
            {"index": 1, "codec_type": "video", "codec_name": "mjpeg", "width": 64,
             "height": 64, "disposition": {"attached_pic": 1}},
        ],
    }  # fmt: skip
    info = parse_probe(data)
    assert info.video is None and info.audio is not None and info.duration == 11.0


def test_check_usable_rejects_images_and_absurd_durations() -> None:
    image = MediaInfo("png_pipe", 0.0, VideoStream(0, "png", "rgb24", 64, 64), None)
    with pytest.raises(BadMediaError, match="still image"):
        check_usable(image, 3600)
    nothing = MediaInfo("mov,mp4", 0.0, None, None)
    with pytest.raises(BadMediaError, match="no audio or video"):
        check_usable(nothing, 3600)
    with pytest.raises(BadMediaError, match="MAX_DURATION_SECONDS"):
        check_usable(_info("h264"), 30)


def test_utf8_split_across_segments_survives() -> None:
    text = "诸行无常，是生灭法。".encode()
    # Cut inside a 3-byte character, as whisper.cpp does at token boundaries.
    raw = [(0, 1000, text[:4]), (1000, 2000, text[4:11]), (2000, 3000, text[11:])]
    segments = decode_segments(raw)
    assert "".join(s.text for s in segments) == "诸行无常，是生灭法。"
    assert all("\ufffd" not in s.text for s in segments)
    assert {s.language for s in segments} == {None}
    # A dangling tail joins the last segment, which keeps the window's detected language.
    detected = decode_segments([(0, 1000, text[:4]), (1000, 2000, text[4:-1])], "zh")
    assert detected[-1].text.endswith("\ufffd") and {s.language for s in detected} == {"zh"}


def test_clean_collapses_repeats_and_drops_blanks() -> None:
    segments = [
        Segment(0, 1000, " Hello "),
        Segment(1000, 2000, "hello"),
        Segment(2000, 3000, "HELLO "),
        Segment(3000, 4000, "   "),
        Segment(4000, 5000, "world", language="en"),
        Segment(5000, 9999, "hello"),
    ]
    cleaned = clean_segments(segments, duration_ms=9000)
    assert cleaned == [
        Segment(0, 3000, "Hello"),
        Segment(4000, 5000, "world", language="en"),  # a detected language is kept
        Segment(5000, 9000, "hello"),
    ]


def test_webvtt_escapes_markup() -> None:
    vtt = render_webvtt([Segment(61_005, 3_723_004, "a --> b & <c>")])
    assert vtt.startswith("WEBVTT\n\n1\n00:01:01.005 --> 01:02:03.004\n")
    assert "a --&gt; b &amp; &lt;c&gt;" in vtt
    assert render_webvtt([]) == "WEBVTT\n\n"


def test_settings_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DB_HOST", "DB_USER", "WEBDAV_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as err:
        load_settings(RunnerSettings)
    assert "DB_HOST is required" in str(err.value)
    assert "WEBDAV_BASE_URL is required" in str(err.value)
    monkeypatch.setenv("DB_HOST", "db")
    monkeypatch.setenv("DB_USER", "u")
    monkeypatch.setenv("WEBDAV_BASE_URL", "https://user:hunter2@dav.example.org")
    monkeypatch.setenv("HLS_BITRATE", "fast")
    with pytest.raises(ConfigError) as err:
        load_settings(RunnerSettings)
    assert "HLS_BITRATE='fast' is invalid" in str(err.value)
    assert "WEBDAV_BASE_URL" in str(err.value) and "hunter2" not in str(err.value)


def test_exit_code_contract() -> None:
    assert classify_exit_code(ExitCode.PERMANENT) is ErrorClass.PERMANENT
    assert classify_exit_code(ExitCode.FENCED) is ErrorClass.FENCED
    for code in (1, 11, 137, -9, None):
        assert classify_exit_code(code) is ErrorClass.TEMPORARY


def test_one_line_limits_bytes_without_splitting_characters() -> None:
    message = one_line("第一行\n第二行 " * 500, limit=100)
    assert "\n" not in message and len(message.encode()) <= 100
    message.encode("utf-8").decode("utf-8")


def test_crash_description_carries_no_exception_text() -> None:
    """A real UnicodeEncodeError quoting a character of a secret: the line and the stack
    name the type and the place, never the text (issue 10, defect 9)."""
    from jobrunner.cli import describe_crash

    secret = "pw-密"
    try:
        secret.encode("latin-1")
    except UnicodeEncodeError as exc:
        message, stack = describe_crash(exc)
    assert message.startswith("internal error in the jobrunner: UnicodeEncodeError at ")
    assert "test_runner_units.py:" in message and stack
    for text in [message, *stack]:
        assert "密" not in text and "\\u5bc6" not in text and "position" not in text


def test_content_length_is_parsed_strictly() -> None:
    """Issue 10, defect 8: only digits, repeats only if equal."""
    from jobrunner.webdav import _Retryable, declared_length

    assert declared_length([]) is None
    assert declared_length(["42"]) == 42
    assert declared_length(["42", " 42 ", "42, 42"]) == 42
    for bad in (["-1"], ["+1"], ["1_0"], ["4 2"], [""], ["0x10"], ["١٢"], ["1", "2"]):
        with pytest.raises(_Retryable):
            declared_length(bad)


@pytest.mark.parametrize("vcodec", ["h264", "vp9", None])
def test_every_read_of_the_source_is_pinned_to_the_allowed_demuxers(vcodec: str | None) -> None:
    """Issue 10, defect 6: FFmpeg, like ffprobe, may only read the source as a
    self-contained media file from the local disk."""
    from jobrunner.probe import SOURCE_INPUT_OPTIONS

    ws = Workspace(Path("/scratch"), ".mp4")
    plan = make_plan(_info(vcodec), ws, EncodeOptions())
    for cmd in (plan.pcm, plan.main):
        assert cmd is not None
        at = cmd.index(str(ws.source))
        assert cmd[at - 1 - len(SOURCE_INPUT_OPTIONS) : at - 1] == SOURCE_INPUT_OPTIONS
    assert "hls" not in SOURCE_INPUT_OPTIONS[3].split(",")
    assert "concat" not in SOURCE_INPUT_OPTIONS[3].split(",")


class _Headers(dict[str, str]):
    def getlist(self, name: str) -> list[str]:
        return [self[name]] if name in self else []


class _Body:
    """Just enough of a streamed `requests.Response` (and its `raw`) for
    `WebDAVClient.download`."""

    status_code, reason = 200, "OK"

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.headers = _Headers({"Content-Length": str(len(data))})
        self.raw = self

    def read1(self, size: int, decode_content: bool = False) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("declared", "free", "missing"),
    [(1000, 2500, None), (1000, 2499, 1), (0, 0, None), (8 * 1024**3, 20 * 1024**3, None),
     (9 * 1024**3, 20 * 1024**3, int(2.5 * 9 * 1024**3) - 20 * 1024**3)],
)  # fmt: skip
def test_scratch_shortfall(declared: int, free: int, missing: int | None) -> None:
    from jobrunner.webdav import scratch_shortfall

    assert scratch_shortfall(declared, free) == missing


@pytest.mark.parametrize(("free", "fits"), [(10_000, True), (2_000, False)])
def test_download_refuses_a_source_the_scratch_space_cannot_hold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, fits: bool
) -> None:
    """Checked before a byte is written: evicted at 20 GiB it would be retried three times,
    downloading again each time. Free space comes through `free_bytes` (a real filesystem of
    a chosen size is not something a unit test can make)."""
    from jobrunner.webdav import WebDAVClient

    client = WebDAVClient("http://dav.invalid", "", "")
    monkeypatch.setattr(client, "_request", lambda *a, **k: _Body(b"x" * 1000))
    dest = tmp_path / "source.mp4"

    def download() -> int:
        return client.download(["a.mp4"], dest, 10**6, free_bytes=lambda _: free)

    if fits:
        assert download() == 1000
        return
    with pytest.raises(PermanentError, match=r"1,000 bytes.*2,500.*2,000 bytes free"):
        download()
    assert not dest.exists()


def test_the_runner_parses_the_command_line_of_the_contract() -> None:
    from dharma_common.contract import RUNNER_MODULE, RUNNER_PROGRAM, runner_command
    from jobrunner.cli import build_parser

    command = runner_command(42, 3)
    assert command[0] == RUNNER_PROGRAM == build_parser().prog
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.job_id, args.attempt) == ("run", 42, 3)
    local = runner_command(42, 3, python="/usr/bin/python3")
    assert local == ["/usr/bin/python3", "-m", RUNNER_MODULE, *command[1:]]
