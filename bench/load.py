"""Load and soak of the controller on the test control plane: a backlog of thousands of rows,
or a steady feed for up to an hour (issue 6, "Load and soak").

Why: `bench.controller` measures latency and Jobs per second over a couple of thousand rows;
this one asks whether the controller holds up over a long or large run. It reports throughput
(rows completed and Jobs created per second), latency percentiles from queued to Job created
and from queued to row completed, the controller's RSS and its PostgreSQL connections sampled
over the whole run (a timeline of about 20 lines, and a growth check: the last third of the
run against the first third, after a warm-up of 10 %), API requests per Job, and duplicate
Jobs (must be 0).

What runs is `bench.controller`'s harness (`bench.harness`), unchanged: the shared testbed
as a session of this process (KWOK pods "succeed after --pod-delay", each with the runner's
final commit played for it by `devtools.simulated_runner`, on a connection of its own: not
counted below as the controller's), a real PostgreSQL with its own migrated database, and ONE
`dharma-controller run --executor kubernetes` as the Helm chart's ServiceAccount,
`MAX_CONCURRENT_JOBS=--cap` (200).

Two modes:

* backlog (default): `--rows` rows (5,000) queued up front, once the controller is ready and
  idle, in `--batch`-row INSERT transactions back to back (5,000 rows take well under a
  second to insert; the controller is already claiming meanwhile, as it would in production
  after a bulk upload). Then wait until every row is completed.
* soak (`--soak-seconds N`): rows fed at a steady `--rate` per second for N seconds (one row
  per INSERT transaction, as uploads arrive; a batch when the feeder falls behind), then wait
  for the drain. The timeline of RSS and connections over the whole run is the point here.
  A soak sets JOB_TTL_SECONDS=60 (`--job-ttl`): with the controller's default (7 days) every
  finished Job and pod of the hour would stay in its caches, and RSS would grow with them
  (~5-8 KiB per Job) however sound the controller is. With a short TTL a Job and its pods
  leave the caches about a minute after it finished (a pod may linger as a tombstone for up
  to 10 min when its deletion is seen before its Job's), so they level off; the growth check
  starts after TTL + 11 min to be sure, and what growth is left is the controller's own. A
  soak shorter than ~25 minutes cannot show a steady state.

"Queued" is the local time just before a row's INSERT is sent; "Job created" is when this
process's watch first saw the Job; "row completed" is the row's `finished_at` (PostgreSQL on
the same machine, same clock). Controller connections: rows of `pg_stat_activity` whose
`application_name` starts with `dharma-controller` (the store's `dharma-controller <pod>` and
the listener's `dharma-controller-listen <pod>`: 2 expected).

Usage:
  python -m bench.load --rows 5000                      # backlog
  python -m bench.load --soak-seconds 3600 --rate 20    # one-hour soak
  (both accept --cap, --pod-delay, --batch, --timeout, --keep-testbed, --json PATH)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from bench.cluster import SA_FLOW_SCHEMA
from bench.harness import (
    Harness,
    Periodic,
    Stopped,
    add_harness_arguments,
    harness,
    insert_rows,
    run_and_publish,
    status_counts,
)
from bench.report import (
    RUNNER_COMMITS_NOTE,
    first_seen_and_duplicates,
    format_load,
    format_table,
    percentile,
)
from controller.informer import TOMBSTONE_SECONDS
from devtools.services import Database

#: The controller's connections, and which of them are the LISTEN connection.
CONNECTIONS_QUERY = (
    "SELECT count(*), count(*) FILTER (WHERE application_name LIKE 'dharma-controller-listen%')"
    " FROM pg_stat_activity WHERE application_name LIKE 'dharma-controller%'"
)
TIMELINE_LINES = 20
#: A soak's JOB_TTL_SECONDS: finished Jobs (and their pods) are deleted a minute after they
#: finish and leave the controller's caches then (a pod whose deletion is seen before its
#: Job's may linger as a tombstone for TOMBSTONE_SECONDS), so the caches reach a steady state
#: within TTL + 11 minutes at most and any growth left is the controller's own. With the
#: default (7 days) every Job of the hour stays.
SOAK_JOB_TTL = 60
#: Growth flagged when the last third's mean exceeds the first third's by more than this
#: fraction and by more than GROWTH_MIN_MIB.
GROWTH_FRACTION = 0.10
GROWTH_MIN_MIB = 5.0


class ConnectionSampler(Periodic):
    """Counts the controller's PostgreSQL connections every `interval` seconds."""

    def __init__(self, db: Database, interval: float) -> None:
        super().__init__(interval, "bench-db")
        self._db = db
        self._conn: Any = None
        #: (time, controller connections, of which LISTEN)
        self.samples: list[tuple[float, int, int]] = []

    def tick(self) -> None:
        try:
            if self._conn is None:
                self._conn = self._db.connect()
            with self._conn.cursor() as cur:
                cur.execute(CONNECTIONS_QUERY)
                total, listen = cur.fetchone()
            self.samples.append((time.time(), int(total), int(listen)))
        except psycopg2.Error:
            self._close()

    def stop(self) -> None:
        super().stop()
        self._close()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
        self._conn = None


# ------------------------------------------------------------------------ feeding ---


def queue_backlog(conn: Any, rows: int, batch: int) -> dict[int, float]:
    """`rows` rows in `batch`-row INSERT transactions, back to back: id -> queued time."""
    inserted: dict[int, float] = {}
    while len(inserted) < rows:
        ids, at = insert_rows(conn, min(batch, rows - len(inserted)))
        inserted.update(dict.fromkeys(ids, at))
    return inserted


def feed_steadily(
    h: Harness, conn: Any, rate: float, seconds: float, batch: int
) -> dict[int, float]:
    """`rate` rows per second for `seconds`: one per INSERT, or the rows due in one INSERT
    (at most `batch`) when the feeder is behind. Stops early if the controller exits."""
    inserted: dict[int, float] = {}
    start = time.monotonic()
    every = max(5.0, seconds / 60)
    next_report = start
    while (now := time.monotonic()) < start + seconds and h.proc.poll() is None:
        due = min(batch, math.floor((now - start) * rate) + 1 - len(inserted))
        if due > 0:
            ids, at = insert_rows(conn, due)
            inserted.update(dict.fromkeys(ids, at))
        if now >= next_report:
            h.progress(status_counts(conn))
            next_report = now + every
        time.sleep(max(0.0, start + len(inserted) / rate - time.monotonic()))
    return inserted


# ------------------------------------------------------------------------ the run ---


@dataclass
class LoadRun:
    mode: str
    cap: int
    #: JOB_TTL_SECONDS given to the controller (None: its default)
    job_ttl: int | None
    inserted: dict[int, float]
    ready_at: float
    feed_end: float
    completed_at: float | None
    statuses: dict[str, int]
    stopped: Stopped
    rss_samples: list[tuple[float, int]]
    rss_idle_mib: float
    cpu_ready: float
    connections: list[tuple[float, int, int]]
    load_before: tuple[float, float, float]
    log_path: Path
    notes: list[str] = field(default_factory=list)


def run(args: argparse.Namespace, workdir: Path, publish: Callable[[LoadRun], None]) -> None:
    soak = args.soak_seconds > 0
    scale = args.soak_seconds if soak else 0.0
    with harness(args, workdir, rss_interval=max(0.25, scale / 2400)) as h:
        sampler = ConnectionSampler(h.db, max(1.0, scale / 1200))
        sampler.tick()
        sampler.start()
        conn = h.connect()
        ready_at = time.time()
        if soak:
            mode = f"soak: {args.rate:g} rows/s for {args.soak_seconds:g} s"
            print(f"{mode}, then drain", file=sys.stderr)
            inserted = feed_steadily(h, conn, args.rate, args.soak_seconds, args.batch)
        else:
            mode = f"backlog: {args.rows} rows queued up front, {args.batch} per INSERT"
            print(mode, file=sys.stderr)
            inserted = queue_backlog(conn, args.rows, args.batch)
        feed_end = time.time()
        completed_at, counts = h.wait_drained(conn, args.timeout, every=max(5.0, scale / 60))
        sampler.stop()
        stopped = h.stop(conn)
        conn.close()
        notes = []
        if stopped.metrics_status != 200:
            notes.append(f"controller /metrics unavailable ({stopped.metrics_status})")
        # Published before the clean-up, which may take a while.
        publish(
            LoadRun(
                mode=mode,
                cap=args.cap,
                job_ttl=args.job_ttl,
                inserted=inserted,
                ready_at=ready_at,
                feed_end=feed_end,
                completed_at=completed_at,
                statuses=counts,
                stopped=stopped,
                rss_samples=h.sampler.samples,
                rss_idle_mib=h.rss_idle_mib,
                cpu_ready=h.cpu_ready,
                connections=sampler.samples,
                load_before=h.load_before,
                log_path=h.log_path,
                notes=notes,
            )
        )


# ------------------------------------------------------------------------ report ---


def warm_up(r: LoadRun, start: float, end: float) -> float:
    """Where the growth check starts: after 10 % of the run, or, when it comes before
    mid-run, once the caches must have reached their steady state: the first Jobs have
    finished, passed their TTL, and any pod tombstones have expired (`TOMBSTONE_SECONDS`)."""
    warm = start + 0.1 * (end - start)
    if r.job_ttl is not None:
        steady = start + r.job_ttl + TOMBSTONE_SECONDS + 60
        if steady < start + (end - start) / 2:
            warm = max(warm, steady)
    return warm


def _thirds(
    samples: Sequence[tuple[float, float]], warm: float, end: float
) -> tuple[list[float], list[float]]:
    """Values in the first and last third of [warm, end]."""
    third = (end - warm) / 3
    first = [v for t, v in samples if warm <= t < warm + third]
    last = [v for t, v in samples if end - third <= t <= end]
    return first, last


def growth(samples: Sequence[tuple[float, float]], warm: float, end: float) -> tuple[str, bool]:
    """Mean of the last third against the first third (after warm-up), and whether it grew."""
    first, last = _thirds(samples, warm, end)
    if not first or not last:
        return "n/a (too few samples)", False
    a, b = sum(first) / len(first), sum(last) / len(last)
    grew = b - a > max(GROWTH_MIN_MIB, GROWTH_FRACTION * a)
    return f"{a:.1f} -> {b:.1f} MiB ({b - a:+.1f})", grew


def _nice_step(span: float) -> float:
    raw = span / TIMELINE_LINES
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 180, 300, 600, 900, 1800):
        if step >= raw:
            return float(step)
    return 3600.0


def _count_until(times: list[float], t: float) -> int:
    return sum(1 for x in times if x <= t)


def timeline(r: LoadRun, end: float) -> list[str]:
    """One line per step (span / ~20): rows queued, Jobs created and rows completed so far,
    and the controller's RSS and DB connections (max within the step)."""
    step = _nice_step(end - r.ready_at)
    queued = sorted(r.inserted.values())
    created = sorted(j.seen for j in r.stopped.jobs.values())
    done = sorted(at for _, _, at in r.stopped.finished)
    lines = [("t (s)", "queued", "Jobs", "completed", "RSS MiB", "DB conns")]
    t = r.ready_at
    while t < end:
        hi = min(t + step, end)
        rss = [kib / 1024 for at, kib in r.rss_samples if t <= at <= hi]
        conns = [n for at, n, _ in r.connections if t <= at <= hi]
        lines.append((
            f"{hi - r.ready_at:.0f}", str(_count_until(queued, hi)),
            str(_count_until(created, hi)), str(_count_until(done, hi)),
            f"{max(rss):.0f}" if rss else "-", str(max(conns)) if conns else "-",
        ))  # fmt: skip
        t = hi
    return format_table(lines)


def latencies(r: LoadRun) -> tuple[list[float], list[float], int]:
    """Queued -> Job created and queued -> row completed (seconds), and duplicate Jobs."""
    first_seen, duplicates = first_seen_and_duplicates(r.stopped.jobs)
    finished = {i: at for i, _, at in r.stopped.finished}
    to_job = [first_seen[(i, 1)] - t for i, t in r.inserted.items() if (i, 1) in first_seen]
    to_done = [finished[i] - t for i, t in r.inserted.items() if i in finished]
    return to_job, to_done, duplicates


def _pcts(values: list[float]) -> str:
    if not values:
        return "n/a"
    return " / ".join(f"{percentile(values, q):.2f}" for q in (50, 90, 99, 100)) + " s"


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds > 0 else "n/a"


def report(r: LoadRun) -> tuple[str, bool]:
    """The figures, the timeline, and whether the run was clean (every row completed once,
    no duplicate, no RSS or connection growth)."""
    s = r.stopped
    start = min(r.inserted.values(), default=r.ready_at)
    end = r.completed_at or time.time()
    to_job, to_done, duplicates = latencies(r)
    created = sorted(j.seen for j in s.jobs.values())
    jobs_span = (created[-1] - start) if created else math.nan
    completed = r.statuses.get("completed", 0)
    rows = len(r.inserted)
    rss = [(t, kib / 1024) for t, kib in r.rss_samples]
    warm = warm_up(r, start, end)
    rss_growth, rss_grew = growth(rss, warm, end)
    conns = [(t, float(n)) for t, n, _ in r.connections]
    conn_first, conn_last = _thirds(conns, warm, end)
    conn_grew = bool(conn_first and conn_last and max(conn_last) > max(conn_first))
    api_per_job = s.api_requests / len(s.jobs) if s.jobs else math.nan
    # Jobs past their TTL are gone by the end: the list can only be short, never long.
    ok_once = duplicates == 0 and len(s.jobs) == rows >= s.listed_jobs
    ok_done = r.completed_at is not None and completed == rows

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        ("Metric", "Figure", "Target", ""),
        ("Run", r.mode, "", ""),
        ("Finished Jobs kept (JOB_TTL_SECONDS)",
         "controller default" if r.job_ttl is None else f"{r.job_ttl} s", "", ""),
        ("Wall time, first INSERT -> last row completed", f"{end - start:.1f} s", "", ""),
        ("Rows completed / s", _rate(completed, end - start), "", ""),
        ("Jobs created / s (first INSERT -> last Job seen)", _rate(len(created), jobs_span),
         "", ""),
        ("Rows queued, in", f"{rows} in {r.feed_end - start:.2f} s "
         f"({_rate(rows, r.feed_end - start)}/s)", "", ""),
        ("Queued -> Job created p50 / p90 / p99 / max", _pcts(to_job), "", ""),
        ("Queued -> row completed p50 / p90 / p99 / max", _pcts(to_done), "", ""),
        ("Rows completed (attempts > 1) / rows queued",
         f"{completed} ({s.attempts_over_one}) / {rows}", "all (0)", mark(ok_done)),
        ("Duplicate Jobs (per job id+attempt > 1)", str(duplicates), "0", mark(ok_once)),
        ("Jobs seen / still listed at end", f"{len(s.jobs)} / {s.listed_jobs}", "= rows / <=",
         mark(ok_once)),
        ("Controller RSS idle / max sampled / VmHWM",
         f"{r.rss_idle_mib:.0f} / {max((v for _, v in rss), default=0):.0f} / "
         f"{s.rss_hwm_kib / 1024:.0f} MiB", "<= 150 MB", mark(s.rss_hwm_kib <= 150 * 1024)),
        ("Controller RSS, mean first third -> last third", rss_growth, "no growth",
         _growth_mark(rss_grew, r.job_ttl)),
        ("Controller RSS per Job listed at end ((max - idle) / listed)",
         _per_job_kib(r, s.listed_jobs), "", ""),
        ("Controller DB connections max (LISTEN)",
         f"{max((n for _, n, _ in r.connections), default=0)} "
         f"({max((n for _, _, n in r.connections), default=0)})", "2 (1)", ""),
        ("Controller DB connections max, first third -> last third",
         f"{max(conn_first, default=0):.0f} -> {max(conn_last, default=0):.0f}", "no growth",
         "GROWTH" if conn_grew else "ok"),
        ("API requests by the controller per Job", f"{api_per_job:.2f}", "", ""),
        ("Controller CPU time (user+system): at ready / in all",
         f"{r.cpu_ready:.1f} / {s.cpu_seconds:.1f} s", "", ""),
        ("Controller CPU per Job, ready -> drained", _cpu_per_job(r, len(s.jobs)), "", ""),
        ("Load average 1/5/15 min before -> after",
         f"{format_load(r.load_before)} -> {format_load(s.load_after)}", "", ""),
    ]  # fmt: skip
    lines.append(("  growth compared over", f"{warm - start:.0f} s -> {end - start:.0f} s", "", ""))
    out = [*format_table(lines), "", "Timeline (since the controller was ready):"]
    out += timeline(r, end)
    out += ["", *(f"note: {n}" for n in _notes(r))]
    # Without a short TTL every Job stays cached, so RSS grows with them by design.
    rss_ok = not rss_grew or r.job_ttl is None
    return "\n".join(out), ok_once and ok_done and rss_ok and not conn_grew


def _cpu_per_job(r: LoadRun, jobs: int) -> str:
    """The steady cost of a Job: the CPU spent after start-up (imports, migrations, the
    first lists, which a long-running controller pays once) over the Jobs it made."""
    if not jobs:
        return "n/a"
    return f"{(r.stopped.cpu_seconds - r.cpu_ready) * 1000 / jobs:.2f} ms"


def _growth_mark(grew: bool, job_ttl: int | None) -> str:
    if not grew:
        return "ok"
    return "GROWTH (expected: every Job stays cached)" if job_ttl is None else "GROWTH"


def _per_job_kib(r: LoadRun, listed: int) -> str:
    top = max((kib for _, kib in r.rss_samples), default=0) / 1024
    if r.job_ttl is not None:
        return "n/a (deleted Jobs stay cached as tombstones)"
    if not listed:
        return "n/a"
    return f"{(top - r.rss_idle_mib) * 1024 / listed:.1f} KiB"


def _notes(r: LoadRun) -> list[str]:
    s = r.stopped
    notes = list(r.notes)
    if s.late:
        notes.append(f"{len(s.late)} Jobs were first seen by a relist (their time is late)")
    if s.exit_code not in (0, None):
        notes.append(f"controller exit status {s.exit_code}")
    notes.append(
        f"API requests: apiserver_flowcontrol_dispatched_requests_total{{flow_schema="
        f"{SA_FLOW_SCHEMA!r}}} delta = {s.api_requests:.0f}, watches and lists included; API "
        f"server restarts during the run (other sessions' tests): {s.api_resets}."
    )
    notes.append(
        f"growth: mean over the last third of the run against the first third, after a "
        f"warm-up (10 % of the run, or Job TTL + {TOMBSTONE_SECONDS:.0f} s of tombstones + "
        f"60 s when longer and before mid-run); flagged above +{GROWTH_FRACTION:.0%} and "
        f"+{GROWTH_MIN_MIB:g} MiB."
    )
    notes.append(RUNNER_COMMITS_NOTE.format(s.runner_commits))
    notes.append(f"controller log: {r.log_path}")
    return notes


def _raw(r: LoadRun) -> dict[str, Any]:
    return {
        "mode": r.mode, "cap": r.cap, "inserted": r.inserted, "ready_at": r.ready_at,
        "feed_end": r.feed_end, "completed_at": r.completed_at, "statuses": r.statuses,
        "job_seen": {j.name: j.seen for j in r.stopped.jobs.values()},
        "finished": r.stopped.finished, "rss_samples_kib": r.rss_samples,
        "connections": r.connections, "api_requests": r.stopped.api_requests,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="load (a backlog of rows) and soak (a steady feed) of dharma-controller",
    )
    parser.add_argument("--rows", type=int, default=5000, help="backlog: rows queued up front")
    parser.add_argument(
        "--soak-seconds", type=float, default=0, help="soak: feed rows for this long instead"
    )
    parser.add_argument("--rate", type=float, default=20.0, help="soak: rows per second")
    parser.add_argument("--batch", type=int, default=100, help="most rows per INSERT")
    parser.add_argument(
        "--job-ttl",
        type=int,
        help="JOB_TTL_SECONDS, how long finished Jobs stay (default: 60 for a soak, the "
        "controller's own default, 7 days, for a backlog)",
    )
    add_harness_arguments(parser, timeout=3600)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.cap < 1 or args.rate <= 0 or args.batch < 1:
        parser.error("--rows, --cap, --rate and --batch must be positive")
    if args.job_ttl is None and args.soak_seconds > 0:
        args.job_ttl = SOAK_JOB_TTL
    if args.job_ttl is not None:
        args.controller_env.append(f"JOB_TTL_SECONDS={args.job_ttl}")
    return run_and_publish("load", args, run, report, _raw)


if __name__ == "__main__":
    sys.exit(main())
