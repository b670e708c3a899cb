"""WebDAV passwords outside Latin-1 (issue 10, defect 9), against the real WsgiDAV.

requests encodes Basic credentials given as text in Latin-1, so a password with a CJK
character or an emoji raised UnicodeEncodeError, whose text — the character and its
position — reached the termination message (and from there the job row) and the logs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.services import WebDAVServer
from dharma_common.contract import ExitCode
from tests.conftest import Queue
from tests.integration.runner import run_jobrunner

pytestmark = pytest.mark.integration

#: Latin-1 (ü), CJK (the BMP) and an emoji (astral): each fails differently in Latin-1.
PASSWORD = "pä-密碼-🧘-x"


class UnicodeDAV(WebDAVServer):
    """The suite's WsgiDAV server, with an account whose password is not Latin-1."""

    user = "lehrer-李"
    password = PASSWORD


@pytest.fixture
def dav() -> Iterator[WebDAVServer]:
    """Overrides the suite's `dav`, so `queue` and `runner_env` use this server."""
    server = UnicodeDAV()
    yield server
    server.close()


def _traces(secret: str) -> list[str]:
    """What a leak could look like: the secret, each non-ASCII character of it, and the
    escapes Python uses for them in exception text and JSON logs."""
    found = [secret]
    for char in {c for c in secret if not c.isascii()}:
        found += [char, ascii(char).strip("'"), char.encode("unicode_escape").decode()]
        found += [char.encode("utf-8").hex(), f"\\\\u{ord(char):04x}"]
    return found


def test_non_latin1_password_works(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    job = queue.job("audio_mp3")
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == 0, result.message
    assert (dav.path(f"talks/2510/{job.media_id}") / "audio.m4a").is_file()


def test_wrong_non_latin1_password_is_refused_without_a_trace_of_it(
    queue: Queue, runner_env: dict[str, str], dav: WebDAVServer
) -> None:
    """One non-Latin-1 character, and an ASCII user name so the password is what fails to
    encode: the case whose UnicodeEncodeError named the character and its position."""
    wrong = "geheim-字-0"
    runner_env.update(WEBDAV_USER="dav-user", WEBDAV_PASSWORD=wrong)
    job = queue.job("audio_mp3")
    result = run_jobrunner(runner_env, job.job_id, job.attempt)
    assert result.code == ExitCode.PERMANENT, result.message
    assert "HTTP 401" in result.message, result.message
    text = result.message + result.stderr
    leaks = [t for t in [*_traces(wrong), "position", "codec"] if t in text]
    assert leaks == [], (leaks, result.message)
