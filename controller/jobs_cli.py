"""`dharma-controller jobs ...`: list, show, enqueue, retry and cancel jobs.

Operators used to do this with hand-written SQL (docs/operations.md kept the recipes). A
command does the same thing the same way every time: it reads the controller's own database
settings (DB_HOST, ...), every statement is a named query in controller/queries.sql, every
status change is one UPDATE fenced on the statuses it may start from (so a row that moved on
meanwhile is reported, never overwritten), and the one-run-per-media rule (migration 0006)
holds for what it enqueues. Output is for people by default; `--output json` is for scripts.
Exit status: 0 done, 1 something was refused or not found (the rest was still done), 2 bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import re
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dharma_common.contract import LABEL_MEDIA_ID, JobStatus
from dharma_common.errors import first_line
from dharma_common.logs import configure_logging
from dharma_common.models import is_model_name
from dharma_common.settings import ConfigError, DatabaseSettings, load_settings

log = logging.getLogger(__name__)

#: Priority of backfill jobs. The claim takes higher priorities first (queries.sql `claim`),
#: and an upload's row has the default 0, so a backfill never starves new uploads.
BACKFILL_PRIORITY = -10
#: Priority of `jobs enqueue MEDIA_ID`: the same as an upload's row (the column's default).
SINGLE_PRIORITY = 0
#: A backfill larger than this asks for confirmation (or `--yes`).
CONFIRM_THRESHOLD = 100
#: pg_advisory_xact_lock key of `jobs enqueue` ("dhme").
ENQUEUE_LOCK_KEY = 0x6468_6D65
#: The longest `initial_prompt` (migration 0008's CHECK constraint; jobrunner/script.py
#: MAX_PROMPT_CHARS, which a test holds equal).
MAX_PROMPT_CHARS = 400
#: Where the namespace of a pod's service account is, when the command runs in the cluster.
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

OK, REFUSED, USAGE = 0, 1, 2
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)
CANCELLABLE = (JobStatus.PENDING, JobStatus.PROCESSING)


class CommandError(Exception):
    """A request the command refuses as a whole (missing job, unknown media); exit 1."""


class UsageError(Exception):
    """Flags that do not make one request; exit 2."""


# ------------------------------------------------------------------------ the parser ---


def add_jobs_parser(sub: Any) -> None:
    """Register `jobs` and its subcommands on the top-level parser's subparsers."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--output", choices=("text", "json"), default="text",
        help="text for people (default) or json for scripts",
    )  # fmt: skip
    jobs = sub.add_parser(
        "jobs", help="list, show, enqueue, retry or cancel jobs",
        description="Inspect and change dharma.stt_jobs with the controller's settings "
        "(DB_HOST, DB_USER, ...). Exit status 1 if anything was refused or not found.",
    )  # fmt: skip
    cmd = jobs.add_subparsers(dest="jobs_command", required=True)

    listing = cmd.add_parser("list", parents=[output], help="jobs, newest first")
    listing.add_argument(
        "--status", action="append", choices=[s.value for s in JobStatus],
        help="only this status (repeat for several)",
    )  # fmt: skip
    listing.add_argument("--media", type=uuid.UUID, help="only the jobs of this media id")
    listing.add_argument("--category", help="only media of this category_id")
    listing.add_argument(
        "--reason", help="only this failure_reason (oom_killed, deadline_exceeded, ...)"
    )
    listing.add_argument(
        "--since", type=parse_since,
        help="created at or after: a duration back from now (30m, 12h, 7d, 2w) or an ISO "
        "date/time (UTC unless it says otherwise)",
    )  # fmt: skip
    listing.add_argument("--limit", type=_positive, default=50, help="at most N rows (50)")

    show = cmd.add_parser("show", parents=[output], help="one job, its history and its logs")
    show.add_argument("job_id", type=int, metavar="ID")

    enqueue = cmd.add_parser(
        "enqueue", parents=[output],
        help="enqueue one media, or backfill many at a lower priority",
        description="Enqueue MEDIA_ID (priority 0, like an upload), or with --backfill every "
        f"media selected (priority {BACKFILL_PRIORITY}: new uploads go first). A media that "
        "already has a pending or processing job is never enqueued again.",
    )  # fmt: skip
    enqueue.add_argument("media_id", nargs="?", type=uuid.UUID, metavar="MEDIA_ID")
    enqueue.add_argument("--backfill", action="store_true", help="enqueue many media")
    enqueue.add_argument("--category", help="backfill: media of this category_id")
    enqueue.add_argument(
        "--without-subtitles", action="store_true",
        help="backfill: media with no subtitles and no completed run",
    )  # fmt: skip
    enqueue.add_argument("--all", action="store_true", help="backfill: every media")
    enqueue.add_argument("--language", help="the jobs' language (default: WHISPER_LANGUAGE)")
    enqueue.add_argument(
        "--model", type=model_name,
        help="the jobs' whisper model, a name in the catalog (WHISPER_MODELS); default: the "
        "runner's WHISPER_MODEL. A name the catalog lacks fails the job, naming the known ones",
    )  # fmt: skip
    enqueue.add_argument(
        "--initial-prompt", type=initial_prompt, metavar="TEXT",
        help=f"the jobs' initial prompt for whisper (at most {MAX_PROMPT_CHARS} characters; '' "
        "for none); default: WHISPER_PROMPTS for the job's language",
    )  # fmt: skip
    enqueue.add_argument("--dry-run", action="store_true", help="count, enqueue nothing")
    enqueue.add_argument(
        "--yes", action="store_true",
        help=f"do not ask before enqueuing more than {CONFIRM_THRESHOLD} jobs",
    )  # fmt: skip

    retry = cmd.add_parser(
        "retry", parents=[output],
        help="failed or cancelled -> pending, with a fresh retry budget",
    )  # fmt: skip
    retry.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    retry.add_argument("--force", action="store_true", help="also re-run completed jobs")

    cancel = cmd.add_parser("cancel", parents=[output], help="pending or processing -> cancelled")
    cancel.add_argument("job_ids", type=int, nargs="+", metavar="ID")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def model_name(text: str) -> str:
    """A model's name as the row's CHECK constraint admits it (migration 0009). Whether the
    catalog has it is the controller's to say: the catalog is the deployment's, not this
    command's environment's."""
    if not is_model_name(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model name (letters, digits, '.', '_', '-'; at most 64)"
        )
    return text


def initial_prompt(text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise argparse.ArgumentTypeError(
            f"is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are used"
        )
    if any(ord(c) < 32 and c not in "\n\t" for c in text):
        raise argparse.ArgumentTypeError("contains control characters")
    return text


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`--since`: `7d` reads as "the last seven days" (what an operator types after an
    incident); an ISO date or time is taken as UTC unless it carries an offset."""
    match = _DURATION.match(text.strip())
    now = now or dt.datetime.now(dt.timezone.utc)
    if match:
        return now - dt.timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 12h, 7d, 2w) nor an ISO date/time"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


# ------------------------------------------------------------------------ running ---


def run_jobs(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run one `jobs` subcommand; its exit status. Log lines (JSON, stderr) are kept for
    warnings unless LOG_LEVEL asks for more: the command's own output is what people read."""
    configure_logging(os.environ.get("LOG_LEVEL", "WARNING"))
    import psycopg2

    try:
        if args.jobs_command == "enqueue":
            selection_of(args)  # a bad combination of flags needs no database to refuse
        db = load_settings(DatabaseSettings)
    except UsageError as exc:
        print(f"dharma-controller jobs {args.jobs_command}: {exc}", file=sys.stderr)
        return USAGE
    except ConfigError as exc:
        print(f"dharma-controller: configuration error: {exc}", file=sys.stderr)
        return USAGE
    handlers = {
        "list": _cmd_list, "show": _cmd_show, "enqueue": _cmd_enqueue,
        "retry": _cmd_retry, "cancel": _cmd_cancel,
    }  # fmt: skip
    try:
        with _connect(db) as conn:
            return handlers[args.jobs_command](conn, args, out)
    except CommandError as exc:
        print(f"dharma-controller jobs {args.jobs_command}: {exc}", file=sys.stderr)
        return REFUSED
    except psycopg2.Error as exc:
        print(f"dharma-controller: database error on {db.describe()}: {first_line(exc)}",
              file=sys.stderr)  # fmt: skip
        return REFUSED


@contextlib.contextmanager
def _connect(db: DatabaseSettings) -> Iterator[Any]:
    """One connection for the command; each step commits on its own (`with conn:`), so
    nothing stays locked while the command waits for an answer at the prompt."""
    import psycopg2
    import psycopg2.extras

    psycopg2.extras.register_uuid()  # type: ignore[no-untyped-call]
    conn = psycopg2.connect(**db.connect_kwargs("dharma-controller-jobs"))
    try:
        yield conn
    finally:
        conn.close()


def _fetch(conn: Any, name: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run a named query of controller/queries.sql in its own transaction."""
    from controller.store import Q

    with conn, conn.cursor() as cur:
        cur.execute(Q[name], params)
        return list(cur.fetchall())


def _emit_json(out: TextIO, value: Any) -> None:
    json.dump(value, out, indent=2, default=_json_default)
    out.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------ list ---


def attempts_text(attempts: int, attempts_base: int, max_attempts: int) -> str:
    """Attempts as `n of m` in the current retry budget (migration 0003), as the controller
    counts them: `attempts` itself never resets (it is the fencing token)."""
    return f"{attempts - attempts_base} of {max_attempts}"


def age_text(seconds: float) -> str:
    """A short age a person reads at a glance: 45s, 12m, 3h 5m, 2d 4h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, _ = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


_LIST_COLUMNS = ("id", "media_id", "category", "status", "progress", "attempts",
                 "attempts_base", "max_attempts", "priority", "runner_name",
                 "failure_reason", "created_at", "age_seconds")  # fmt: skip


def _cmd_list(conn: Any, args: argparse.Namespace, out: TextIO) -> int:
    rows = _fetch(
        conn, "jobs_list", statuses=args.status, media_id=args.media, category=args.category,
        reason=args.reason, since=args.since, limit=args.limit,
    )  # fmt: skip
    jobs = [dict(zip(_LIST_COLUMNS, row, strict=True)) for row in rows]
    if args.output == "json":
        for job in jobs:
            job["attempt_text"] = attempts_text(
                job["attempts"], job["attempts_base"], job["max_attempts"]
            )
        _emit_json(out, jobs)
        return OK
    table = [("ID", "STATUS", "PROGRESS", "ATTEMPTS", "RUNNER", "AGE", "MEDIA", "REASON")]
    for job in jobs:
        progress = "-" if job["progress"] is None else f"{job['progress']:.0%}"
        table.append((
            str(job["id"]), job["status"], progress,
            attempts_text(job["attempts"], job["attempts_base"], job["max_attempts"]),
            job["runner_name"] or "-", age_text(job["age_seconds"]), str(job["media_id"]),
            job["failure_reason"] or "",
        ))  # fmt: skip
    _print_table(out, table)
    if not jobs:
        out.write("(no jobs match)\n")
    return OK


def _print_table(out: TextIO, table: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


# ------------------------------------------------------------------------ show ---

_SHOW_COLUMNS = ("id", "media_id", "status", "priority", "progress", "language", "model",
                 "initial_prompt", "attempts",
                 "attempts_base", "max_attempts", "result_attempt", "runner_name",
                 "claimed_by", "memory_limit", "error_message", "failure_reason",
                 "created_at", "updated_at", "run_after", "processing_started_at",
                 "finished_at", "age_seconds", "title", "category_id", "source_path",
                 "duration_seconds")  # fmt: skip
_MEDIA_JOB_COLUMNS = ("id", "status", "attempts", "attempts_base", "max_attempts",
                      "failure_reason", "created_at", "finished_at")  # fmt: skip


def namespace() -> str | None:
    """The namespace runners are in, if this environment says: NAMESPACE (the controller's
    setting), else the service account's when run in a pod; None when unknown."""
    value = os.environ.get("NAMESPACE", "").strip()
    if value:
        return value
    with contextlib.suppress(OSError):
        return Path(SA_NAMESPACE_FILE).read_text(encoding="utf-8").strip() or None
    return None


def earlier_runner_names(runner_name: str | None, job_id: int, attempts: int) -> list[str]:
    """Job names of every attempt of this row. Only the current attempt's is stored, but
    names are `<prefix>-<instance>-<job id>-<attempt>` (controller/jobspec.py), so the
    earlier ones (kept for ttlSecondsAfterFinished) follow from it."""
    suffix = f"-{job_id}-{attempts}"
    if not runner_name or not runner_name.endswith(suffix):
        return [runner_name] if runner_name else []
    stem = runner_name[: -len(suffix)]
    return [f"{stem}-{job_id}-{n}" for n in range(1, attempts + 1)]


def log_commands(job: dict[str, Any], ns: str | None) -> list[str]:
    """The exact `kubectl` lines of docs/operations.md "Reading a job's logs" for this row."""
    flag = f"-n {ns}" if ns else "-n <namespace>"
    commands = [
        f"kubectl {flag} logs -l {LABEL_MEDIA_ID}={job['media_id']} --prefix --tail=-1",
    ]
    if job["runner_name"]:
        commands.append(f"kubectl {flag} logs job/{job['runner_name']}")
    return commands


def _cmd_show(conn: Any, args: argparse.Namespace, out: TextIO) -> int:
    rows = _fetch(conn, "jobs_show", job_id=args.job_id)
    if not rows:
        raise CommandError(f"no job with id {args.job_id}")
    job = dict(zip(_SHOW_COLUMNS, rows[0], strict=True))
    history = [dict(zip(_MEDIA_JOB_COLUMNS, r, strict=True))
               for r in _fetch(conn, "jobs_of_media", media_id=job["media_id"])]  # fmt: skip
    job["attempt_text"] = attempts_text(job["attempts"], job["attempts_base"], job["max_attempts"])
    job["runner_names"] = earlier_runner_names(job["runner_name"], job["id"], job["attempts"])
    job["log_commands"] = log_commands(job, namespace())
    job["media_jobs"] = history
    if args.output == "json":
        _emit_json(out, job)
        return OK
    _print_show(out, job)
    return OK


def when(value: dt.datetime | None) -> str | None:
    """A timestamp in UTC to the second: the database's times, read the same everywhere."""
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print_show(out: TextIO, job: dict[str, Any]) -> None:
    def line(label: str, value: Any) -> None:
        if value is not None and value != "":
            out.write(f"{label + ':':<22}{value}\n")

    line("job", job["id"])
    line("status", job["status"])
    line("progress", None if job["progress"] is None else f"{job['progress']:.0%}")
    line("media", f"{job['media_id']} ({job['category_id']}) {job['title'] or ''}".rstrip())
    line("source", job["source_path"])
    line("duration", job["duration_seconds"] and f"{job['duration_seconds']:.1f} s")
    line("language", job["language"] or "(WHISPER_LANGUAGE)")
    line("model", job["model"] or "(WHISPER_MODEL)")
    prompt = job["initial_prompt"]
    line("initial prompt", "(WHISPER_PROMPTS)" if prompt is None else repr(prompt))
    line("priority", job["priority"])
    age = age_text(job["age_seconds"])
    line("created", f"{when(job['created_at'])} ({age} ago)")
    out.write("\nattempts (the database keeps the latest attempt's details):\n")
    line("  this budget", f"attempt {job['attempt_text']}")
    line("  claims in all", job["attempts"])
    line("  before re-queue", job["attempts_base"] or None)
    line("  result committed", job["result_attempt"] and f"by attempt {job['result_attempt']}")
    line("  claimed by", job["claimed_by"])
    line("  memory limit", job["memory_limit"])
    if job["status"] == JobStatus.PENDING.value:
        line("  run after", when(job["run_after"]))
    line("  started", when(job["processing_started_at"]))
    line("  finished", when(job["finished_at"]))
    line("  failure reason", job["failure_reason"])
    line("  error", job["error_message"])
    if job["runner_names"]:
        out.write("\nrunners (Jobs are kept for ttlSecondsAfterFinished):\n")
        for name in job["runner_names"]:
            out.write(f"  {name}\n")
    out.write("\nlogs:\n")
    for command in job["log_commands"]:
        out.write(f"  {command}\n")
    if len(job["media_jobs"]) > 1:
        out.write("\nevery job of this media:\n")
        table = [("ID", "STATUS", "ATTEMPTS", "CREATED", "REASON")]
        for other in job["media_jobs"]:
            table.append((
                str(other["id"]) + (" *" if other["id"] == job["id"] else ""), other["status"],
                attempts_text(other["attempts"], other["attempts_base"], other["max_attempts"]),
                f"{other['created_at']:%Y-%m-%d %H:%M}", other["failure_reason"] or "",
            ))  # fmt: skip
        _print_table(out, [tuple("  " + c if i == 0 else c for i, c in enumerate(row))
                           for row in table])  # fmt: skip


# ------------------------------------------------------------------------ enqueue ---


@dataclass(frozen=True)
class Selection:
    """Which media a `jobs enqueue` means: one media, or a backfill's filters."""

    media_id: uuid.UUID | None
    category: str | None
    without_subtitles: bool

    @property
    def backfill(self) -> bool:
        return self.media_id is None

    def describe(self) -> str:
        if self.media_id is not None:
            return f"media {self.media_id}"
        parts = [f"category {self.category!r}"] if self.category else []
        parts += ["without subtitles"] if self.without_subtitles else []
        return "media " + (" and ".join(parts) if parts else "(all)")


def selection_of(args: argparse.Namespace) -> Selection:
    """Check the flags make one clear request: MEDIA_ID alone, or --backfill with at least
    one of --category/--without-subtitles or --all (so a typo cannot enqueue everything)."""
    filters = args.category is not None or args.without_subtitles
    if args.media_id is not None:
        if args.backfill or filters or args.all:
            raise UsageError("MEDIA_ID cannot be combined with --backfill and its filters")
        return Selection(args.media_id, None, False)
    if not args.backfill:
        raise UsageError("give a MEDIA_ID, or --backfill with --category, --without-subtitles "
                         "or --all")  # fmt: skip
    if args.all == filters:
        raise UsageError("--backfill needs --category and/or --without-subtitles, or --all "
                         "(not both)")  # fmt: skip
    return Selection(None, args.category, args.without_subtitles)


def _candidates(conn: Any, selection: Selection) -> list[uuid.UUID]:
    """The media the request would enqueue now (a media with a live job never is)."""
    if selection.media_id is None:
        rows = _fetch(conn, "jobs_backfill_candidates", category=selection.category,
                      without_subtitles=selection.without_subtitles)  # fmt: skip
        return [row[0] for row in rows]
    state = _fetch(conn, "jobs_media_state", media_id=selection.media_id)
    if not state:
        raise CommandError(f"no media with id {selection.media_id} in dharma.media_files")
    live = state[0][1]
    if live:
        raise CommandError(
            f"media {selection.media_id} already has job {live[0]} pending or processing "
            "(one run per media); nothing enqueued"
        )
    return [selection.media_id]


def confirmed(count: int, selection: Selection, yes: bool, stdin: TextIO = sys.stdin) -> bool:
    """Ask before a large backfill. Without a terminal there is nobody to ask: refuse, so a
    script must say --yes on purpose."""
    if yes or count <= CONFIRM_THRESHOLD:
        return True
    if not stdin.isatty():
        print(f"dharma-controller jobs enqueue: {count} jobs (more than {CONFIRM_THRESHOLD}) "
              "need confirmation and stdin is not a terminal; rerun with --yes "
              "(or --dry-run to count)", file=sys.stderr)  # fmt: skip
        return False
    sys.stderr.write(f"Enqueue {count} jobs for {selection.describe()} at priority "
                     f"{BACKFILL_PRIORITY}? [y/N] ")  # fmt: skip
    sys.stderr.flush()
    return stdin.readline().strip().lower() in {"y", "yes"}


def _insert(
    conn: Any, media_ids: list[uuid.UUID], priority: int, args: argparse.Namespace
) -> list[tuple[int, uuid.UUID]]:
    """Enqueue under the enqueue lock; media that got a live job meanwhile are skipped."""
    from controller.store import Q

    with conn, conn.cursor() as cur:
        cur.execute(Q["jobs_enqueue_lock"], {"lock_key": ENQUEUE_LOCK_KEY})
        cur.execute(Q["jobs_enqueue"], {"media_ids": media_ids, "priority": priority,
                                        "language": args.language, "model": args.model,
                                        "initial_prompt": args.initial_prompt})  # fmt: skip
        return [(job_id, media_id) for job_id, media_id in cur.fetchall()]


def _cmd_enqueue(conn: Any, args: argparse.Namespace, out: TextIO) -> int:
    selection = selection_of(args)  # checked by run_jobs before connecting
    media_ids = _candidates(conn, selection)
    priority = BACKFILL_PRIORITY if selection.backfill else SINGLE_PRIORITY
    report: dict[str, Any] = {
        "selection": selection.describe(), "priority": priority, "candidates": len(media_ids),
        "dry_run": args.dry_run, "enqueued": [], "skipped": 0,
    }  # fmt: skip
    if args.dry_run:
        return _enqueue_report(out, args.output, report, OK)
    if not confirmed(len(media_ids), selection, args.yes):
        report["refused"] = "confirmation needed (--yes)"
        return _enqueue_report(out, args.output, report, REFUSED)
    enqueued = _insert(conn, media_ids, priority, args) if media_ids else []
    report["enqueued"] = [{"job_id": j, "media_id": m} for j, m in enqueued]
    report["skipped"] = len(media_ids) - len(enqueued)
    if enqueued:
        log.info(
            "jobs enqueued",
            extra={"action": "jobs_enqueued", "count": len(enqueued), "priority": priority,
                   "selection": selection.describe()},
        )  # fmt: skip
    failed = not selection.backfill and not enqueued
    if failed:
        report["refused"] = "a job of this media became live meanwhile, or the media is gone"
    return _enqueue_report(out, args.output, report, REFUSED if failed else OK)


def _enqueue_report(out: TextIO, output: str, report: dict[str, Any], status: int) -> int:
    if output == "json":
        _emit_json(out, report)
        return status
    count = report["candidates"]
    if report["dry_run"]:
        out.write(f"dry run: would enqueue {count} job(s) for {report['selection']} "
                  f"at priority {report['priority']}\n")  # fmt: skip
        return status
    if "refused" in report and not report["enqueued"]:
        out.write(f"nothing enqueued for {report['selection']}: {report['refused']}\n")
        return status
    for item in report["enqueued"]:
        out.write(f"enqueued job {item['job_id']} for media {item['media_id']}\n")
    out.write(f"{len(report['enqueued'])} job(s) enqueued at priority {report['priority']}")
    out.write(f"; {report['skipped']} skipped (a job became live meanwhile)\n"
              if report["skipped"] else "\n")  # fmt: skip
    return status


# ------------------------------------------------------------------------ retry, cancel ---


@dataclass(frozen=True)
class Outcome:
    """What happened to one id of `retry`/`cancel`: applied, or refused with the reason."""

    job_id: int
    applied: bool
    message: str
    previous_status: str | None = None


def retry_one(conn: Any, job_id: int, force: bool) -> Outcome:
    """One fenced UPDATE: failed/cancelled (and completed with --force) -> pending."""
    allowed = [s.value for s in RETRYABLE] + ([JobStatus.COMPLETED.value] if force else [])
    rows = _fetch(conn, "jobs_retry", job_id=job_id, allowed=allowed)
    if rows:
        previous, attempts, base, max_attempts = rows[0]
        log.info("job retried", extra={"action": "job_retried", "job_id": job_id,
                                       "previous_status": previous})  # fmt: skip
        budget = attempts_text(attempts, base, max_attempts)
        return Outcome(job_id, True, f"{previous} -> pending (fresh budget: {budget} "
                       f"attempts used, {attempts} claims in all)", previous)  # fmt: skip
    status, siblings = _refusal_state(conn, job_id)
    if status is None:
        return Outcome(job_id, False, "no such job")
    if status == JobStatus.COMPLETED.value and not force:
        why = "completed: re-running it replaces its results; use --force"
    elif status in allowed and siblings:
        why = (f"{status}, but job {siblings[0]} of the same media is pending or processing "
               "(one run per media)")  # fmt: skip
    elif status == JobStatus.PENDING.value:
        why = "already pending"
    elif status == JobStatus.PROCESSING.value:
        why = "processing: cancel it first to re-run it"
    else:
        why = f"{status}: changed meanwhile"
    return Outcome(job_id, False, why, status)


def cancel_one(conn: Any, job_id: int) -> Outcome:
    """One fenced UPDATE: pending/processing -> cancelled (the controller stops the runner)."""
    rows = _fetch(conn, "jobs_cancel", job_id=job_id)
    if rows:
        previous, _attempts = rows[0]
        log.info("job cancelled", extra={"action": "job_cancelled", "job_id": job_id,
                                         "previous_status": previous})  # fmt: skip
        return Outcome(job_id, True, f"{previous} -> cancelled", previous)
    status, _siblings = _refusal_state(conn, job_id)
    if status is None:
        return Outcome(job_id, False, "no such job")
    return Outcome(job_id, False, f"already {status}: only pending or processing jobs can be "
                   "cancelled", status)  # fmt: skip


def _refusal_state(conn: Any, job_id: int) -> tuple[str | None, list[int]]:
    rows = _fetch(conn, "jobs_refusal", job_id=job_id)
    return (rows[0][0], list(rows[0][1])) if rows else (None, [])


def _report_outcomes(out: TextIO, output: str, outcomes: list[Outcome]) -> int:
    refused = any(not o.applied for o in outcomes)
    if output == "json":
        _emit_json(out, [{"job_id": o.job_id, "applied": o.applied, "message": o.message,
                          "previous_status": o.previous_status} for o in outcomes])  # fmt: skip
    else:
        for o in outcomes:
            out.write(f"job {o.job_id}: {'' if o.applied else 'refused: '}{o.message}\n")
    return REFUSED if refused else OK


def _cmd_retry(conn: Any, args: argparse.Namespace, out: TextIO) -> int:
    ids = list(dict.fromkeys(args.job_ids))
    return _report_outcomes(out, args.output, [retry_one(conn, i, args.force) for i in ids])


def _cmd_cancel(conn: Any, args: argparse.Namespace, out: TextIO) -> int:
    ids = list(dict.fromkeys(args.job_ids))
    return _report_outcomes(out, args.output, [cancel_one(conn, i) for i in ids])
