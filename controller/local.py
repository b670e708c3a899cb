"""The local executor: one `python -m jobrunner run` subprocess per attempt.

For a laptop, a plain Docker host or VPS, the demo, and the integration tests. Same
semantics as a Kubernetes Job, enforced here:

- each runner runs in a new session (its own process group), so it and its FFmpeg children
  can be stopped together and survive nothing they should not;
- a private attempt directory under LOCAL_SCRATCH_DIR/<identity>/ holds the runner's scratch
  space (SCRATCH_DIR), its termination-message file (TERMINATION_MESSAGE_PATH) and a pid file;
  it is removed once the outcome is recorded;
- deadline (JOB_DEADLINE_SECONDS): SIGTERM to the group, SIGKILL after
  LOCAL_TERMINATION_GRACE_SECONDS, reported as "timed out after N s";
- memory (RUNNER_MEMORY_LIMIT, 0 for none, or the row's raised `memory_limit` after an OOM): the
  resident memory of the whole session is sampled every 0.25 s and the group is SIGKILLed
  when it exceeds the limit, reported as "OOM-killed (memory limit X)". Sampling can miss a
  spike shorter than the interval; the kernel's own OOM killer stays the backstop.

The runner inherits the controller's environment (DB_*, WEBDAV_*, WHISPER_*, ...), except
that with LOCAL_RUNNER_DB_USER set it connects as that login (a member of role dharma_runner,
migration 0005) with LOCAL_RUNNER_DB_PASSWORD, never with the controller's password.

After a controller crash its runners are orphans it cannot wait for (no exit status). On
start it finds them through the pid files (pid + start time, so a reused pid is never
signalled), stops them, and reports each attempt as "controller restarted" — a temporary
failure, retried — unless the runner had already committed its results (`result_attempt`),
which reconcile records as a success. Rows claimed by a controller that never came back are
reported abandoned once its deadline has certainly passed (`abandoned_after`,
`observe_abandoned`), and the service loop records them like any other outcome. On shutdown
the runners are stopped and returned for one last recording pass.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from controller import procfs
from controller.executor import EventReason, Launched, LaunchErrors
from controller.faults import Fault, FaultHooks
from controller.jobspec import Instance, LaunchSpec, UnknownModel, memory, model_entry
from controller.model import (
    REASON_CONTROLLER_RESTARTED,
    REASON_DEADLINE,
    REASON_OOM,
    JobRow,
    KillReason,
    Observation,
    Phase,
    RunnerKey,
)
from controller.quantity import format_bytes, parse_bytes
from controller.settings import ControllerSettings
from controller.threads import WatchedThread
from dharma_common.contract import runner_command
from dharma_common.logs import log_context

log = logging.getLogger(__name__)

#: How often processes are checked for exit, deadline and memory.
MONITOR_INTERVAL_SECONDS = 0.25
_ATTEMPT_DIR = re.compile(r"^(\d+)-(\d+)$")


def runner_environment(settings: ControllerSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """A runner process's environment: the controller's, with the runners' own database
    login in place of the controller's when LOCAL_RUNNER_DB_USER is set (least privilege:
    the runner's role may only touch its own row, its media row and subtitles)."""
    env = {k: v for k, v in environ.items() if not k.startswith("LOCAL_RUNNER_DB_")}
    if settings.LOCAL_RUNNER_DB_USER:
        env["DB_USER"] = settings.LOCAL_RUNNER_DB_USER
        env.pop("DB_PASSWORD", None)
        password = settings.LOCAL_RUNNER_DB_PASSWORD.get_secret_value()
        if password:
            env["DB_PASSWORD"] = password
    return env


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def local_runner_name(settings: ControllerSettings, key: RunnerKey) -> str:
    """`<prefix>-<job id>-<attempt>`: no instance hash, unlike a Job's name. Local runners are
    this controller's own child processes under LOCAL_SCRATCH_DIR/<identity>/, never shared
    with another installation the way a namespace is, so there is nothing to tell apart."""
    return f"{settings.JOB_NAME_PREFIX}-{key.job_id}-{key.attempt}"


@dataclass
class _Runner:
    key: RunnerKey
    name: str
    pid: int
    directory: Path
    popen: subprocess.Popen[bytes] | None
    started: float
    started_at: dt.datetime
    memory_limit: int
    #: With the pid, identifies the process across pid reuse (procfs.is_same_process).
    start_time: int = 0
    #: Why we signalled it.
    killed_for: KillReason | None = None
    term_sent: float | None = None
    kill_sent: bool = False
    outcome: Observation | None = None

    @property
    def termination_file(self) -> Path:
        return self.directory / "termination-log"

    @property
    def scratch(self) -> Path:
        return self.directory / "scratch"


class LocalExecutor:
    """Subprocess runners, watched by one monitor thread."""

    kind = "local"

    def __init__(self, settings: ControllerSettings, faults: FaultHooks | None = None) -> None:
        self._settings = settings
        self._faults = faults
        self.owner: str | None = settings.identity()
        # Another local controller's runner is killed by its deadline, then its grace; a
        # minute more and it is certainly gone.
        self.abandoned_after: float | None = (
            settings.JOB_DEADLINE_SECONDS + settings.LOCAL_TERMINATION_GRACE_SECONDS + 60
        )
        self._launch_errors = LaunchErrors()
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", settings.identity())
        self._root = settings.LOCAL_SCRATCH_DIR / safe
        self._runners: dict[RunnerKey, _Runner] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake: Callable[[], None] = lambda: None
        self._thread = WatchedThread(self._monitor, "local-runners")

    # ------------------------------------------------------------------ lifecycle ---

    def bind(self, instance: Instance) -> None:
        """Nothing to scope: see `local_runner_name`."""

    def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._adopt_orphans()
        self._thread.start()

    def synced(self) -> bool:
        return True

    def problems(self) -> list[str]:
        problem = self._thread.problem()
        return [problem] if problem else []

    def shutdown(self) -> list[RunnerKey]:
        """Stop every runner (SIGTERM, then SIGKILL after the grace) and the monitor. Returns
        the attempts whose outcomes are known, for one last recording pass."""
        self._stop.set()  # this thread takes over the monitoring from here
        self._thread.stop(timeout=5)
        with self._lock:
            running = [r for r in self._runners.values() if r.outcome is None]
        for runner in running:
            self._signal(runner, KillReason.SHUTDOWN)
        deadline = time.monotonic() + self._settings.LOCAL_TERMINATION_GRACE_SECONDS + 5
        while time.monotonic() < deadline:
            self._tick()
            with self._lock:
                if all(r.outcome is not None for r in self._runners.values()):
                    break
            time.sleep(MONITOR_INTERVAL_SECONDS)
        return self.finished_unclaimed()

    # ------------------------------------------------------------------ launching ---

    def _memory_limit(self, spec: LaunchSpec) -> int:
        """The model's memory, else RUNNER_MEMORY_LIMIT (0: none), or the row's raised limit."""
        return parse_bytes(memory(self._settings, spec)[1])

    def launch(self, specs: Sequence[LaunchSpec]) -> list[Launched]:
        results = [self._launch_one(spec) for spec in specs]
        for result in results:
            self._launch_errors.note(result)
        return results

    def _launch_one(self, spec: LaunchSpec) -> Launched:
        key = RunnerKey(spec.job_id, spec.attempt)
        name = local_runner_name(self._settings, RunnerKey(spec.job_id, spec.attempt))
        with self._lock:
            if key in self._runners:
                return Launched(key, name)
        try:
            model_entry(self._settings, spec.model)
        except UnknownModel as exc:
            return Launched(key, None, error=str(exc), invalid=True)
        directory = self._root / f"{spec.job_id}-{spec.attempt}"
        shutil.rmtree(directory, ignore_errors=True)
        (directory / "scratch").mkdir(parents=True, mode=0o700)
        env = runner_environment(self._settings, os.environ)
        env["SCRATCH_DIR"] = str(directory / "scratch")
        env["TERMINATION_MESSAGE_PATH"] = str(directory / "termination-log")
        if spec.model:  # a catalog name (checked above); else the inherited WHISPER_MODEL
            env["WHISPER_MODEL"] = spec.model
        command = runner_command(spec.job_id, spec.attempt, python=sys.executable)
        try:
            popen = subprocess.Popen(
                command, env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            return Launched(key, None, error=f"cannot start {command[0]}: {exc}")
        if self._faults:
            self._faults.crash(Fault.CRASH_AFTER_SPAWN)
        stat = procfs.read_stat(popen.pid)
        start_time = stat.start_time if stat else 0
        _write_pid_file(directory, popen.pid, start_time)
        runner = _Runner(
            key, name, popen.pid, directory, popen, time.monotonic(), _utcnow(),
            self._memory_limit(spec), start_time,
        )  # fmt: skip
        with self._lock:
            self._runners[key] = runner
        with log_context(job_id=spec.job_id, media_id=spec.media_id, attempt=spec.attempt):
            log.info(
                "runner process started",
                extra={"action": "runner_process_started", "runner_name": name, "pid": popen.pid,
                       "memory_limit_bytes": runner.memory_limit or None},
            )  # fmt: skip
        return Launched(key, name)

    # ------------------------------------------------------------------ observing ---

    def observe(self, key: RunnerKey) -> Observation:
        with self._lock:
            runner = self._runners.get(key)
        if runner is None:
            return self._launch_errors.get(key) or Observation(Phase.NONE)
        if runner.outcome is not None:
            return runner.outcome
        return Observation(Phase.RUNNING, runner_name=runner.name, since=runner.started_at)

    def observe_abandoned(self, row: JobRow) -> Observation:
        return Observation(
            Phase.FAILED,
            runner_name=row.runner_name,
            reason=REASON_CONTROLLER_RESTARTED,
            message=f"abandoned: claimed by controller {row.claimed_by!r}, which did not "
            f"finish it within JOB_DEADLINE_SECONDS ({self._settings.JOB_DEADLINE_SECONDS} s)",
        )

    def verify_gone(self, key: RunnerKey, runner_name: str) -> Observation:
        seen = self.observe(key)
        if seen.phase is not Phase.NONE:
            return seen
        return Observation(
            Phase.FAILED,
            runner_name=runner_name,
            reason=REASON_CONTROLLER_RESTARTED,
            message=f"the controller restarted and found no trace of runner {runner_name} "
            f"(no pid file under {self._root}); the attempt's outcome is unknown",
        )

    def alive(self) -> list[RunnerKey]:
        with self._lock:
            return [k for k, r in self._runners.items() if r.outcome is None]

    def finished_unclaimed(self) -> list[RunnerKey]:
        with self._lock:
            return [k for k, r in self._runners.items() if r.outcome is not None]

    def delete(self, key: RunnerKey) -> bool:
        with self._lock:
            runner = self._runners.get(key)
        self._launch_errors.forget(key)
        if runner is not None and runner.outcome is None:
            self._signal(runner, KillReason.DELETE)
        return True

    def forget(self, key: RunnerKey) -> None:
        self._launch_errors.forget(key)
        with self._lock:
            runner = self._runners.pop(key, None)
        if runner is not None:
            shutil.rmtree(runner.directory, ignore_errors=True)

    def record_event(self, key: RunnerKey, reason: EventReason, message: str) -> None:
        """Nothing: a subprocess has no object to hang an Event on, and the loop already logs
        each of these decisions (`job_claimed`, `runner_launched`, `attempt_failed`,
        `attempt_succeeded`, `runner_swept`) with the attempt's job id."""

    # ------------------------------------------------------------------ monitoring ---

    def _monitor(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_SECONDS):
            try:
                self._tick()
            except Exception:  # keep watching whatever one runner did
                log.exception("local runner monitor failed", extra={"action": "monitor_failed"})

    def _tick(self) -> None:
        with self._lock:
            running = [r for r in self._runners.values() if r.outcome is None]
        if not running:
            return
        changed = False
        now = time.monotonic()
        limited = {r.pid for r in running if r.memory_limit}
        rss = procfs.session_rss(limited)
        for runner in running:
            if self._reap(runner):
                changed = True
                continue
            deadline = self._settings.JOB_DEADLINE_SECONDS
            if runner.killed_for is None and now - runner.started > deadline:
                self._signal(runner, KillReason.DEADLINE)
            used = rss.get(runner.pid, 0)
            if runner.memory_limit and used > runner.memory_limit and not runner.kill_sent:
                with log_context(job_id=runner.key.job_id, attempt=runner.key.attempt):
                    log.warning(
                        "runner over its memory limit; killing it",
                        extra={
                            "action": "runner_over_memory",
                            "rss_bytes": used,
                            "memory_limit_bytes": runner.memory_limit,
                        },
                    )
                runner.killed_for = KillReason.OOM
                self._kill(runner, signal.SIGKILL)
            grace = self._settings.LOCAL_TERMINATION_GRACE_SECONDS
            overdue = runner.term_sent is not None and now - runner.term_sent > grace
            if overdue and not runner.kill_sent:
                self._kill(runner, signal.SIGKILL)
        if changed:
            self._wake()

    def _signal(self, runner: _Runner, why: KillReason) -> None:
        """SIGTERM the runner itself, as Kubernetes does to a container's main process (it
        stops its children and cleans up); the monitor SIGKILLs the whole group after the
        grace period."""
        if runner.killed_for is None:
            runner.killed_for = why
        if runner.term_sent is None:
            runner.term_sent = time.monotonic()
            with log_context(job_id=runner.key.job_id, attempt=runner.key.attempt):
                log.info(
                    "stopping runner process",
                    extra={
                        "action": "runner_process_stopping",
                        "pid": runner.pid,
                        "why": why.value,
                    },
                )
            self._kill(runner, signal.SIGTERM)

    def _kill(self, runner: _Runner, sig: signal.Signals) -> None:
        if sig == signal.SIGKILL:
            runner.kill_sent = True
        if runner.pid <= 0:  # an orphan never found: pid 0 would signal our own group
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL:
                os.killpg(runner.pid, sig)
            else:
                os.kill(runner.pid, sig)

    def _reap(self, runner: _Runner) -> bool:
        """If the runner has exited, turn its exit into an Observation."""
        if runner.popen is not None:
            code = runner.popen.poll()
            if code is None:
                return False
        else:  # an orphan from a previous controller: no exit status to collect
            code = None
            if runner.pid > 0 and procfs.is_same_process(runner.pid, runner.start_time):
                return False
        # Stragglers of the group (an FFmpeg child) go with it.
        self._kill(runner, signal.SIGKILL)
        runner.outcome = self._outcome(runner, code)
        shutil.rmtree(runner.scratch, ignore_errors=True)
        with log_context(job_id=runner.key.job_id, attempt=runner.key.attempt):
            log.info(
                "runner process exited",
                extra={
                    "action": "runner_process_exited",
                    "pid": runner.pid,
                    "exit_code": code,
                    "phase": runner.outcome.phase.value,
                    "reason": runner.outcome.reason,
                },
            )
        return True

    def _outcome(self, runner: _Runner, code: int | None) -> Observation:
        message = None
        with contextlib.suppress(OSError):
            message = runner.termination_file.read_text(encoding="utf-8").strip() or None
        failed = Observation(
            Phase.FAILED, runner_name=runner.name, since=runner.started_at,
            message=message, exit_code=code,
        )  # fmt: skip
        if runner.killed_for is KillReason.OOM:
            return replace(
                failed, exit_code=137, reason=REASON_OOM,
                memory_limit=format_bytes(runner.memory_limit),
            )  # fmt: skip
        if runner.killed_for is KillReason.DEADLINE:
            return replace(
                failed, reason=REASON_DEADLINE,
                deadline_seconds=self._settings.JOB_DEADLINE_SECONDS,
            )  # fmt: skip
        if runner.killed_for is KillReason.ORPHAN or code is None:
            said = f" (runner said: {message})" if message else ""
            what = (
                f"while runner {runner.name} (pid {runner.pid}) was running; it was stopped"
                if runner.pid > 0
                else f"while starting runner {runner.name}, and no such process was found; "
                "the attempt's outcome is unknown"
            )
            return replace(
                failed,
                reason=REASON_CONTROLLER_RESTARTED,
                message=f"the controller restarted {what}{said}",
            )
        if code == 0:
            return replace(failed, phase=Phase.SUCCEEDED)
        if code < 0:
            return replace(
                failed, exit_code=128 - code, reason=f"killed by {signal.Signals(-code).name}"
            )
        return replace(failed, reason="Error")

    # ------------------------------------------------------------------ crash recovery ---

    def _adopt_orphans(self) -> None:
        """Find attempt directories a previous run of this controller left behind.

        The directory is made before the runner is started, so a directory means "this
        attempt may have a runner": it is never launched again. With a pid file the runner
        is known; without one (the controller died between starting it and writing the
        file) it is looked up by its environment. Either way a live runner is stopped and
        the attempt reported as "controller restarted" (retried under a new attempt number,
        which fences anything the old runner might still try)."""
        for directory in sorted(self._root.iterdir()):
            match = _ATTEMPT_DIR.match(directory.name)
            if not match or not directory.is_dir():
                continue
            key = RunnerKey(int(match[1]), int(match[2]))
            pid, start = self._orphan_pid(directory)
            runner = _Runner(
                key, local_runner_name(self._settings, key), pid, directory, None,
                time.monotonic(), _utcnow(), 0, start, killed_for=KillReason.ORPHAN,
            )  # fmt: skip
            with log_context(job_id=key.job_id, attempt=key.attempt):
                if pid and procfs.is_same_process(pid, start):
                    log.warning(
                        "stopping a previous controller's runner",
                        extra={"action": "orphan_stopping", "pid": pid},
                    )
                    self._signal(runner, KillReason.ORPHAN)
                else:
                    log.warning(
                        "a previous controller's runner ended",
                        extra={"action": "orphan_ended", "pid": pid},
                    )
            self._runners[key] = runner

    def _orphan_pid(self, directory: Path) -> tuple[int, int]:
        """(pid, start time) of the runner of an attempt directory; (0, 0) if none is known
        or alive. Writes the pid file when the runner had to be found by its environment,
        so a further restart finds it directly."""
        with contextlib.suppress(OSError, ValueError):
            pid_text, start_text = (directory / "pid").read_text().split()
            return int(pid_text), int(start_text)
        stat = procfs.find_session_leader("SCRATCH_DIR", str(directory / "scratch"))
        if stat is None:
            _write_pid_file(directory, 0, 0)
            return 0, 0
        _write_pid_file(directory, stat.pid, stat.start_time)
        return stat.pid, stat.start_time


def _write_pid_file(directory: Path, pid: int, start_time: int) -> None:
    """Atomically: a reader never sees a half-written file, even if we die mid-write."""
    partial = directory / "pid.partial"
    partial.write_text(f"{pid} {start_time}\n")
    partial.replace(directory / "pid")
