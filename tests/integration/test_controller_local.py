"""The controller with the local executor, end to end: real PostgreSQL, real WsgiDAV, the real
jobrunner (FFmpeg + whisper.cpp with the weightless test model) as its subprocesses.

Nothing is mocked. Each test starts `python -m controller run --executor local` as a process
of its own and watches the rows it writes.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.controller_helpers import ControllerProcess, eventually, process_alive
from devtools.services import free_port
from dharma_common.contract import ExitCode
from tests.conftest import Queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Start = Callable[..., ControllerProcess]


def status(queue: Queue, job_id: int) -> tuple[str, int, str | None, str | None]:
    row: tuple[str, int, str | None, str | None] = queue.row(
        "SELECT status, attempts, failure_reason, error_message FROM dharma.stt_jobs WHERE id = %s",
        job_id,
    )
    return row


def test_success_end_to_end(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """An enqueued row ends `completed` with subtitles and artifacts; the runner's name is on
    the row; every log line about the job carries its identity; scratch is cleaned up."""
    media_id = queue.add_media("audio_wav")
    job_id = queue.enqueue(media_id)
    controller = start_controller(controller_env, "--exit-when-idle")
    assert controller.wait(timeout=150) == 0
    state, attempts, reason, message = status(queue, job_id)
    assert (state, attempts, reason, message) == ("completed", 1, None, None)
    runner_name, progress, finished = queue.row(
        "SELECT runner_name, progress, finished_at FROM dharma.stt_jobs WHERE id = %s", job_id
    )
    assert runner_name == f"dharma-stt-{job_id}-1"
    assert progress == 1 and finished is not None
    # The weightless model's words are meaningless (maybe none): check what the runner wrote.
    duration = queue.row("SELECT duration_seconds FROM dharma.media_files WHERE id = %s", media_id)
    assert duration[0] and duration[0] > 10
    assert list(queue.dav.root.rglob("playlist.m3u8")), "no HLS playlist uploaded"
    assert list(queue.dav.root.rglob("*.vtt")), "no subtitles uploaded"
    succeeded = controller.events("attempt_succeeded", job_id=job_id)
    assert succeeded and succeeded[0]["media_id"] == str(media_id)
    assert succeeded[0]["attempt"] == 1
    scratch = Path(controller_env["LOCAL_SCRATCH_DIR"])
    assert not [p for p in scratch.rglob("*") if p.is_dir() and p.name[0].isdigit()]


def test_runner_permanent_error_fails_at_once(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """Bad media: exit 10 with the runner's own message on the row, no retry."""
    job_id = queue.enqueue(queue.add_media("garbage"))
    controller = start_controller(controller_env, "--exit-when-idle")
    assert controller.wait(timeout=120) == 0
    state, attempts, reason, message = status(queue, job_id)
    assert (state, attempts, reason) == ("failed", 1, "runner_error_permanent")
    assert message and "not readable media" in message


def test_deadline_kills_the_process_group(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """JOB_DEADLINE_SECONDS=1: the runner is stopped and the row says "timed out after 1 s";
    a deadline is not retried."""
    job_id = queue.enqueue(queue.add_media("h264_aac_mp4"))
    # The runner could finish an 11 s stream copy inside 1 s: hold its download so the
    # deadline, not the runner's speed, decides the outcome.
    queue.dav.faults.stall(1, 15, method="GET")
    env = {**controller_env, "JOB_DEADLINE_SECONDS": "1"}
    controller = start_controller(env, "--exit-when-idle")
    assert controller.wait(timeout=120) == 0
    state, attempts, reason, message = status(queue, job_id)
    assert (state, attempts, reason) == ("failed", 1, "deadline_exceeded")
    assert message and message.startswith("timed out after 1 s")
    pids = [e["pid"] for e in controller.events("runner_process_started", job_id=job_id)]
    assert pids and not any(process_alive(pid) for pid in pids)


def test_memory_limit_is_enforced(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """A 40 MiB limit cannot hold the runner: it is OOM-killed, the row says so with the
    limit; with RUNNER_MEMORY_LIMIT_MAX equal to the limit there is no bigger retry."""
    job_id = queue.enqueue(queue.add_media("audio_wav"))
    env = {
        **controller_env,
        "RUNNER_MEMORY_LIMIT": "40Mi",
        "RUNNER_MEMORY_LIMIT_MAX": "40Mi",
    }
    controller = start_controller(env, "--exit-when-idle")
    assert controller.wait(timeout=120) == 0
    state, attempts, reason, message = status(queue, job_id)
    assert (state, attempts, reason) == ("failed", 1, "oom_killed")
    assert message and message.startswith("OOM-killed (memory limit 40Mi)")


def test_oom_retry_raises_the_memory_limit(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """After an OOM kill the next attempt runs with limit x RUNNER_OOM_MEMORY_FACTOR (capped),
    and succeeds with it."""
    job_id = queue.enqueue(queue.add_media("audio_wav"))
    env = {
        **controller_env,
        "RUNNER_MEMORY_LIMIT": "40Mi",
        "RUNNER_OOM_MEMORY_FACTOR": "16",
        "RUNNER_MEMORY_LIMIT_MAX": "2Gi",
    }
    controller = start_controller(env, "--exit-when-idle")
    assert controller.wait(timeout=150) == 0
    state, attempts, reason, _ = status(queue, job_id)
    assert (state, attempts, reason) == ("completed", 2, None)
    assert queue.row("SELECT memory_limit FROM dharma.stt_jobs WHERE id = %s", job_id)[0] == "640Mi"
    assert controller.events("attempt_failed", job_id=job_id, failure_reason="oom_killed")


def test_cancellation_stops_the_runner(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """Setting status='cancelled' on a processing row stops its process; nothing overwrites
    `cancelled`. Two ways race to stop it, both correct: the controller's next pass sweeps
    the runner (SIGTERM to its process group), or the runner's own fence check sees the row
    is no longer its own and exits first (exit code 12, FENCED)."""
    job_id = queue.enqueue(queue.add_media("h264_aac_mp4"))
    controller = start_controller(controller_env)
    started = eventually(
        lambda: controller.events("runner_process_started", job_id=job_id), "runner start"
    )
    pid = started[0]["pid"]
    queue.row("UPDATE dharma.stt_jobs SET status = 'cancelled' WHERE id = %s RETURNING id", job_id)
    eventually(lambda: not process_alive(pid), "runner process to be stopped")
    exited = eventually(
        lambda: controller.events("runner_process_exited", job_id=job_id), "exit seen"
    )
    assert controller.stop() == 0
    assert status(queue, job_id)[0] == "cancelled"
    swept = controller.events("runner_swept", job_id=job_id)
    assert swept or exited[0]["exit_code"] == ExitCode.FENCED, exited


def test_sigterm_stops_local_runners_and_records_them(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """SIGTERM with a local runner in flight: the controller stops claiming, sends the runner
    SIGTERM (as Kubernetes would), waits for it, records its outcome — the row is not left
    `processing` — and exits 0 leaving no process behind. (What the runner reports depends
    on where SIGTERM caught it; a run that already committed its results is a success.)"""
    job_id = queue.enqueue(queue.add_media("h264_aac_mp4"))
    env = {**controller_env, "RETRY_BASE_SECONDS": "60", "RETRY_MAX_SECONDS": "60"}
    controller = start_controller(env)
    started = eventually(lambda: controller.events("runner_process_started", job_id=job_id), "run")
    assert controller.stop() == 0
    assert not process_alive(started[0]["pid"])
    assert controller.events("runner_process_stopping", job_id=job_id, why="shutdown")
    state, attempts, reason, _ = status(queue, job_id)
    assert state != "processing" and attempts == 1
    if state == "pending":
        assert reason == "runner_error_temporary"


def test_metrics_and_probes(
    queue: Queue, controller_env: dict[str, str], start_controller: Start
) -> None:
    """/healthz and /readyz answer 200 on a healthy controller; /metrics counts the claim and
    the outcome by reason, and samples the queue."""
    port = free_port()
    env = {**controller_env, "METRICS_PORT": str(port), "QUEUE_METRICS_INTERVAL_SECONDS": "0.5"}
    job_id = queue.enqueue(queue.add_media("garbage"))
    controller = start_controller(env)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    eventually(lambda: get("/readyz")[0] == 200, "/readyz")
    assert get("/healthz")[0] == 200
    eventually(lambda: status(queue, job_id)[0] == "failed", "the job to fail")

    def sampled() -> str | None:
        code, body = get("/metrics")
        wanted = (
            "dharma_claims_total 1.0",
            'dharma_attempt_outcomes_total{outcome="runner_error_permanent"} 1.0',
            'dharma_queue_jobs{status="failed"} 1.0',
            "dharma_attempt_duration_seconds_count",
        )
        return body if code == 200 and all(w in body for w in wanted) else None

    eventually(sampled, "metrics of the finished attempt")
    assert get("/nothing")[0] == 404
    assert controller.stop() == 0
