"""`dharma-controller jobs ...` as operators run it: a real process against a real, migrated
PostgreSQL (one database per test, tests/conftest.py `db`)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.jobs_cli import (
    BACKFILL_PRIORITY,
    CONFIRM_THRESHOLD,
    Selection,
    age_text,
    confirmed,
    earlier_runner_names,
    parse_since,
)
from controller.settings import ControllerSettings
from controller.store import Store
from devtools.services import Database
from dharma_common.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]


class Jobs:
    """Rows of the test's database, and the CLI run against it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.conn = db.connect()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("DB_") and k not in {"NAMESPACE", "LOG_LEVEL"}}  # fmt: skip
        self.env.update(db.env())
        self.env["PYTHONPATH"] = str(REPO)

    def run(
        self, *args: str, stdin: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "controller", "jobs", *args],
            env={**self.env, **env}, input=stdin, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip

    def json(self, *args: str) -> Any:
        result = self.run(*args, "--output", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def json_status(self, *args: str) -> tuple[int, Any]:
        """Exit status and JSON output of a command that may refuse."""
        result = self.run(*args, "--output", "json")
        return result.returncode, json.loads(result.stdout)

    def media(self, category: str = "talks", subtitles: int = 0) -> uuid.UUID:
        media_id: uuid.UUID = self.one(
            "INSERT INTO dharma.media_files (title, category_id, source_path)"
            " VALUES ('a talk', %s, '/uploads/a.mp4') RETURNING id",
            category,
        )
        for n in range(subtitles):
            self.execute(
                "INSERT INTO dharma.subtitles (media_id, start_time_ms, end_time_ms, text)"
                " VALUES (%s, %s, %s, 'words')",
                media_id, n * 1000, n * 1000 + 900,
            )  # fmt: skip
        return media_id

    def job(self, media_id: uuid.UUID, status: str = "pending", **columns: Any) -> int:
        names = ["media_id", "status", *columns]
        values = [media_id, status, *columns.values()]
        job_id: int = self.one(
            f"INSERT INTO dharma.stt_jobs ({', '.join(names)})"
            f" VALUES ({', '.join(['%s'] * len(names))}) RETURNING id",
            *values,
        )
        return job_id

    def one(self, sql: str, *params: Any) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]

    def execute(self, sql: str, *params: Any) -> None:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)

    def row(self, job_id: int) -> dict[str, Any]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT * FROM dharma.stt_jobs WHERE id = %s", (job_id,))
            names = [d[0] for d in cur.description]
            return dict(zip(names, cur.fetchone(), strict=True))


@pytest.fixture
def jobs(db: Database) -> Iterator[Jobs]:
    opened = Jobs(db)
    yield opened
    opened.conn.close()


# ------------------------------------------------------------------------ list ---


def test_list_shows_newest_first_with_attempts_in_the_current_budget(jobs: Jobs) -> None:
    old = jobs.job(jobs.media(), "failed", attempts=5, attempts_base=3, max_attempts=3,
                   failure_reason="oom_killed", runner_name="dharma-stt-ab12cd34-1-5",
                   created_at="2026-01-01T00:00:00Z")  # fmt: skip
    new = jobs.job(jobs.media(), "processing", attempts=1, progress=0.5)
    result = jobs.run("list")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PROGRESS", "ATTEMPTS", "RUNNER", "AGE",
                                "MEDIA", "REASON"]  # fmt: skip
    assert lines[1].split()[:4] == [str(new), "processing", "50%", "1"]
    assert "1 of 3" in lines[1]
    assert lines[2].split()[:2] == [str(old), "failed"]
    assert "2 of 3" in lines[2] and "dharma-stt-ab12cd34-1-5" in lines[2]
    assert "oom_killed" in lines[2] and "d" in lines[2].split()[6]  # an age in days


def test_list_filters_and_json(jobs: Jobs) -> None:
    lectures = jobs.media(category="lectures")
    talk = jobs.media(category="talks")
    failed = jobs.job(lectures, "failed", attempts=3, failure_reason="deadline_exceeded")
    oom = jobs.job(talk, "failed", attempts=3, failure_reason="oom_killed")
    pending = jobs.job(talk, "pending")
    old = jobs.job(jobs.media(), "completed", attempts=1, created_at="2020-01-01T00:00:00Z")

    def ids(*args: str) -> list[int]:
        return [job["id"] for job in jobs.json("list", *args)]

    assert ids("--status", "failed", "--category", "lectures") == [failed]
    assert ids("--status", "pending", "--status", "completed") == [pending, old]
    assert ids("--reason", "deadline_exceeded") == [failed]
    assert ids("--media", str(talk)) == [pending, oom]
    assert old not in ids("--since", "7d")
    assert old in ids("--since", "2019-12-31")
    assert len(ids("--limit", "2")) == 2
    (row,) = jobs.json("list", "--status", "pending")
    assert row["attempt_text"] == "0 of 3" and row["media_id"] == str(talk)
    assert row["age_seconds"] >= 0 and row["created_at"].startswith("20")


def test_list_refuses_a_bad_since(jobs: Jobs) -> None:
    result = jobs.run("list", "--since", "yesterday")
    assert result.returncode == 2
    assert "neither a duration" in result.stderr


# ------------------------------------------------------------------------ show ---


def test_show_prints_the_row_its_history_and_the_log_commands(jobs: Jobs) -> None:
    media = jobs.media()
    first = jobs.job(media, "completed", attempts=1, result_attempt=1)
    job = jobs.job(media, "failed", attempts=4, attempts_base=2, max_attempts=3,
                   error_message="OOM-killed (limit 2Gi)", failure_reason="oom_killed",
                   processing_started_at="2026-02-01T10:00:00Z",
                   finished_at="2026-02-01T10:05:00Z")  # fmt: skip
    jobs.execute("UPDATE dharma.stt_jobs SET runner_name = %s WHERE id = %s",
                 f"dharma-stt-ab12cd34-{job}-4", job)  # fmt: skip
    result = jobs.run("show", str(job), NAMESPACE="dharma")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "attempt 2 of 3" in out and "OOM-killed (limit 2Gi)" in out and "oom_killed" in out
    assert f"kubectl -n dharma logs job/dharma-stt-ab12cd34-{job}-4" in out
    assert f"kubectl -n dharma logs -l dharma.stream/media-id={media} --prefix --tail=-1" in out
    assert f"dharma-stt-ab12cd34-{job}-1" in out  # earlier attempts' Jobs follow from the name
    assert f"{first}" in out.split("every job of this media:")[1]

    shown = jobs.json("show", str(job))
    assert shown["attempts"] == 4 and shown["attempts_base"] == 2
    assert shown["failure_reason"] == "oom_killed" and shown["result_attempt"] is None
    assert shown["finished_at"].startswith("2026-02-01T10:05:00")
    assert [j["id"] for j in shown["media_jobs"]] == [first, job]
    assert shown["log_commands"][0].startswith("kubectl -n <namespace> logs -l")
    assert len(shown["runner_names"]) == 4


def test_show_of_a_missing_job_is_a_clear_error(jobs: Jobs) -> None:
    result = jobs.run("show", "987654")
    assert result.returncode == 1
    assert "no job with id 987654" in result.stderr
    assert result.stdout == ""


def test_a_missing_setting_is_named(jobs: Jobs) -> None:
    env = {k: v for k, v in jobs.env.items() if k != "DB_HOST"}
    result = subprocess.run(
        [sys.executable, "-m", "controller", "jobs", "list"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "DB_HOST is required but not set" in result.stderr


# ------------------------------------------------------------------------ enqueue ---


def test_enqueue_one_media_and_never_twice(jobs: Jobs) -> None:
    media = jobs.media()
    result = jobs.run("enqueue", str(media), "--language", "en")
    assert result.returncode == 0, result.stderr
    (job_id,) = [r["id"] for r in jobs.json("list", "--media", str(media))]
    assert f"enqueued job {job_id} for media {media}" in result.stdout
    row = jobs.row(job_id)
    assert (row["status"], row["priority"], row["language"]) == ("pending", 0, "en")

    again = jobs.run("enqueue", str(media))
    assert again.returncode == 1
    assert f"already has job {job_id} pending or processing" in again.stderr
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs WHERE media_id = %s", media) == 1


def test_enqueue_with_a_model_and_an_initial_prompt(jobs: Jobs) -> None:
    """Issue 12: a job's model (migration 0009) and initial prompt (0008) from the command
    line, shown by `jobs show`; a name the row's constraint would refuse is a usage error."""
    media = jobs.media()
    prompt = "以下是法師的開示。"
    result = jobs.run("enqueue", str(media), "--model", "tiny.en", "--initial-prompt", prompt)
    assert result.returncode == 0, result.stderr
    (job_id,) = [r["id"] for r in jobs.json("list", "--media", str(media))]
    row = jobs.row(job_id)
    assert (row["model"], row["initial_prompt"]) == ("tiny.en", "以下是法師的開示。")
    shown = jobs.run("show", str(job_id)).stdout
    assert "model:                tiny.en" in shown
    assert "initial prompt:       '以下是法師的開示。'" in shown
    assert jobs.json("show", str(job_id))["model"] == "tiny.en"

    other = jobs.media()
    assert jobs.run("enqueue", str(other), "--initial-prompt", "").returncode == 0
    (plain,) = [r["id"] for r in jobs.json("list", "--media", str(other))]
    assert (jobs.row(plain)["model"], jobs.row(plain)["initial_prompt"]) == (None, "")
    shown = jobs.run("show", str(plain)).stdout
    assert "model:                (WHISPER_MODEL)" in shown

    third = jobs.media()
    for args in (["--model", "../ggml-base.bin"], ["--model", "a" * 65], ["--model", ""],
                 ["--initial-prompt", "字" * 401], ["--initial-prompt", "a\x07b"]):  # fmt: skip
        refused = jobs.run("enqueue", str(third), *args)
        assert refused.returncode == 2, (args, refused.stderr)
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs WHERE media_id = %s", third) == 0


def test_the_cli_prompt_limit_is_the_runners() -> None:
    from controller.jobs_cli import MAX_PROMPT_CHARS
    from jobrunner.script import MAX_PROMPT_CHARS as RUNNER_MAX

    assert MAX_PROMPT_CHARS == RUNNER_MAX


def test_the_database_refuses_a_model_name_that_is_no_catalog_key(jobs: Jobs) -> None:
    """Migration 0009's constraint: whatever writes the row (an admin's INSERT), a name with a
    path's characters never gets in."""
    import psycopg2

    media = jobs.media()
    for bad in ("../../etc/passwd", "/models/ggml-base.bin", "a b", "-x", "a" * 65, ""):
        with pytest.raises(psycopg2.errors.CheckViolation, match="stt_jobs_model_name"):
            jobs.job(media, model=bad)
    for good in ("base", "tiny.en", "large-v3-turbo-q5_0", "a" * 64):
        jobs.job(media, "completed", model=good)


def test_enqueue_of_an_unknown_media_is_refused(jobs: Jobs) -> None:
    missing = uuid.uuid4()
    result = jobs.run("enqueue", str(missing))
    assert result.returncode == 1
    assert f"no media with id {missing}" in result.stderr
    assert jobs.run("enqueue", "not-a-uuid").returncode == 2


def test_enqueue_needs_one_clear_request(jobs: Jobs) -> None:
    for args in ([], ["--backfill"], ["--backfill", "--all", "--category", "x"],
                 [str(jobs.media()), "--backfill", "--all"], ["--category", "x"]):  # fmt: skip
        result = jobs.run("enqueue", *args)
        assert result.returncode == 2, (args, result.stdout)
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs") == 0


def test_backfill_selects_dry_runs_and_skips_live_media(jobs: Jobs) -> None:
    bare = [jobs.media("lectures") for _ in range(3)]
    subtitled = jobs.media("lectures", subtitles=2)
    silent = jobs.media("lectures")  # completed with no speech: not "without subtitles"
    jobs.job(silent, "completed", attempts=1)
    busy = jobs.media("lectures")
    live = jobs.job(busy, "processing", attempts=1)
    other = jobs.media("talks")

    dry = jobs.json("enqueue", "--backfill", "--category", "lectures", "--dry-run")
    assert dry["candidates"] == 5 and dry["dry_run"] and dry["enqueued"] == []
    text = jobs.run("enqueue", "--backfill", "--without-subtitles", "--dry-run")
    assert "would enqueue 4 job(s)" in text.stdout  # 3 bare lectures + the talk
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs") == 2

    done = jobs.json("enqueue", "--backfill", "--category", "lectures", "--without-subtitles")
    assert sorted(m["media_id"] for m in done["enqueued"]) == sorted(map(str, bare))
    assert done["priority"] == BACKFILL_PRIORITY
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs WHERE media_id = %s", busy) == 1
    assert jobs.row(live)["status"] == "processing"

    rest = jobs.json("enqueue", "--backfill", "--all")
    expected = sorted(map(str, [subtitled, silent, other]))
    assert sorted(m["media_id"] for m in rest["enqueued"]) == expected
    assert jobs.json("enqueue", "--backfill", "--all", "--dry-run")["candidates"] == 0


def test_a_backfill_never_starves_new_uploads(jobs: Jobs, db: Database) -> None:
    """The claim takes higher priorities first: an upload inserted after a backfill (plain
    INSERT, priority 0) is claimed before every backfill row."""
    for _ in range(3):
        jobs.media()
    assert jobs.run("enqueue", "--backfill", "--all").returncode == 0
    upload = jobs.job(jobs.media(), "pending")
    store = Store(load_settings(ControllerSettings, **db.env()), "test-jobs-cli")
    try:
        (claimed,) = store.claim("test", batch=1, max_in_flight=10)
    finally:
        store.close()
    assert claimed.id == upload


def test_a_large_backfill_needs_confirmation(jobs: Jobs) -> None:
    with jobs.conn.cursor() as cur:
        cur.execute(
            "INSERT INTO dharma.media_files (category_id, source_path)"
            " SELECT 'archive', '/uploads/' || n || '.mp4' FROM generate_series(1, %s) AS n",
            (CONFIRM_THRESHOLD + 1,),
        )
    refused = jobs.run("enqueue", "--backfill", "--category", "archive", stdin="y\n")
    assert refused.returncode == 1
    assert "stdin is not a terminal" in refused.stderr and "--yes" in refused.stderr
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs") == 0

    done = jobs.run("enqueue", "--backfill", "--category", "archive", "--yes")
    assert done.returncode == 0, done.stderr
    assert f"{CONFIRM_THRESHOLD + 1} job(s) enqueued at priority {BACKFILL_PRIORITY}" in done.stdout
    assert jobs.one("SELECT count(*) FROM dharma.stt_jobs WHERE status = 'pending'") == (
        CONFIRM_THRESHOLD + 1
    )


# ------------------------------------------------------------------------ retry, cancel ---


def test_retry_gives_a_fresh_budget_and_refuses_what_it_may_not(jobs: Jobs) -> None:
    failed = jobs.job(jobs.media(), "failed", attempts=3, max_attempts=3,
                      error_message="no attempts left", failure_reason="oom_killed")  # fmt: skip
    cancelled = jobs.job(jobs.media(), "cancelled", attempts=1)
    completed = jobs.job(jobs.media(), "completed", attempts=1, result_attempt=1)
    processing = jobs.job(jobs.media(), "processing", attempts=2)
    result = jobs.run("retry", str(failed), str(cancelled), str(completed), str(processing),
                      "424242")  # fmt: skip
    assert result.returncode == 1
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines[f"job {failed}"].startswith("failed -> pending")
    assert lines[f"job {cancelled}"].startswith("cancelled -> pending")
    assert "--force" in lines[f"job {completed}"] and "refused" in lines[f"job {completed}"]
    assert "cancel it first" in lines[f"job {processing}"]
    assert lines["job 424242"] == "refused: no such job"

    row = jobs.row(failed)
    assert (row["status"], row["attempts"], row["attempts_base"]) == ("pending", 3, 3)
    assert row["error_message"] is None and row["failure_reason"] is None  # trigger, 0003
    assert jobs.row(completed)["status"] == "completed"
    assert jobs.row(processing)["status"] == "processing"

    forced = jobs.json("retry", "--force", str(completed))
    assert forced == [{"job_id": completed, "applied": True, "previous_status": "completed",
                       "message": forced[0]["message"]}]  # fmt: skip
    assert jobs.row(completed)["status"] == "pending"


def test_retry_keeps_one_run_per_media(jobs: Jobs) -> None:
    media = jobs.media()
    failed = jobs.job(media, "failed", attempts=3)
    jobs.job(media, "pending")
    result = jobs.run("retry", str(failed))
    assert result.returncode == 1
    assert "of the same media is pending or processing" in result.stdout
    assert jobs.row(failed)["status"] == "failed"


def test_cancel_is_fenced_on_live_statuses(jobs: Jobs) -> None:
    pending = jobs.job(jobs.media(), "pending")
    processing = jobs.job(jobs.media(), "processing", attempts=1)
    completed = jobs.job(jobs.media(), "completed", attempts=1)
    result = jobs.run("cancel", str(pending), str(processing))
    assert result.returncode == 0, result.stderr
    assert f"job {pending}: pending -> cancelled" in result.stdout
    assert f"job {processing}: processing -> cancelled" in result.stdout
    row = jobs.row(processing)
    assert row["status"] == "cancelled" and row["attempts"] == 1 and row["finished_at"]

    refused = jobs.json_status("cancel", str(completed), str(pending), "424242")
    assert refused[0] == 1
    by_id = {o["job_id"]: o for o in refused[1]}
    assert not by_id[completed]["applied"] and "already completed" in by_id[completed]["message"]
    assert not by_id[pending]["applied"] and "already cancelled" in by_id[pending]["message"]
    assert by_id[424242]["message"] == "no such job"
    assert jobs.row(completed)["status"] == "completed"


def test_logs_carry_actions_when_asked(jobs: Jobs) -> None:
    job = jobs.job(jobs.media(), "pending")
    result = jobs.run("cancel", str(job), LOG_LEVEL="INFO")
    assert result.returncode == 0
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert any(line.get("action") == "job_cancelled" for line in lines), result.stderr


# ------------------------------------------------------------------------ no database ---


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_person_at_a_terminal_is_asked(capsys: pytest.CaptureFixture[str]) -> None:
    selection = Selection(None, "talks", False)
    big = CONFIRM_THRESHOLD + 1
    assert confirmed(big, selection, yes=False, stdin=_Terminal("y\n"))
    assert "Enqueue 101 jobs for media category 'talks'" in capsys.readouterr().err
    assert not confirmed(big, selection, yes=False, stdin=_Terminal("\n"))
    assert not confirmed(big, selection, yes=False, stdin=io.StringIO("y\n"))  # not a tty
    assert confirmed(big, selection, yes=True, stdin=io.StringIO(""))
    assert confirmed(CONFIRM_THRESHOLD, selection, yes=False, stdin=io.StringIO(""))


def test_since_ages_and_runner_names() -> None:
    now = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)
    assert parse_since("7d", now) == dt.datetime(2026, 2, 22, 12, tzinfo=dt.timezone.utc)
    assert parse_since("30m", now) == dt.datetime(2026, 3, 1, 11, 30, tzinfo=dt.timezone.utc)
    assert parse_since("2026-02-01") == dt.datetime(2026, 2, 1, tzinfo=dt.timezone.utc)
    assert parse_since("2026-02-01T08:00+08:00").utcoffset() == dt.timedelta(hours=8)
    assert [age_text(s) for s in (5, 600, 3 * 3600 + 300, 2 * 86400)] == [
        "5s", "10m", "3h 5m", "2d"]  # fmt: skip
    assert earlier_runner_names("dharma-stt-ab12cd34-7-2", 7, 2) == [
        "dharma-stt-ab12cd34-7-1", "dharma-stt-ab12cd34-7-2"]  # fmt: skip
    assert earlier_runner_names("something-else", 7, 2) == ["something-else"]
    assert earlier_runner_names(None, 7, 0) == []
