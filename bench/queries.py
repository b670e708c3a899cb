"""Cost of the controller's hot queries on a queue with a long history (EXPLAIN ANALYZE).

Why: `dharma.stt_jobs` keeps every finished row (the platform shows them), so after a year
most of the table is history the controller must never scan. Every pass of the service loop
runs `inflight` and `next_due`; every claim runs `claim`; every 15 s the queue gauges run
`queue_depth` and `oldest_pending_age`. This benchmark builds a real PostgreSQL database
(migrated by `controller.migrate`, the same indexes as production) holding `--history`
finished rows (completed/failed/cancelled, spread over a year), `--pending` pending rows (a
fifth of them backing off into the future) and `--processing` in-flight rows, then for each
query prints the median wall time of `--repeat` executions, the plan's shared-buffer pages
touched and the access path, and the full plan of the claim.

The claim is compared with the original specification's claim (one row per statement,
`ORDER BY created_at`, no index it can use) claiming the same number of rows, in the same
database in the same run; the ratio is printed. Writes run inside a transaction that is
rolled back, so every repetition sees the same queue.

Usage: python -m bench.queries [--history 100000[,1000000]] [--pending 1000] [--repeat 25]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from controller.store import CLAIM_LOCK_KEY, Q
from devtools.services import Database, DatabaseFactory, PostgresServer

#: The queue gauge's query before issue 11 (item 9), for comparison.
QUEUE_DEPTH_BEFORE = "SELECT status, count(*) FROM dharma.stt_jobs GROUP BY status"

#: The original specification's claim (seed), verbatim but for the schema it runs on.
NAIVE_CLAIM = """
UPDATE dharma.stt_jobs
SET status = 'processing', processing_started_at = now()
WHERE id = (
    SELECT id FROM dharma.stt_jobs
    WHERE status = 'pending'
    ORDER BY created_at
    FOR UPDATE SKIP LOCKED
    LIMIT 1
)
RETURNING id, media_id
"""

POPULATE = """
INSERT INTO dharma.media_files (category_id, source_path, title)
SELECT 'talks', '/uploads/talks/' || g || '.mp4', 'talk ' || g
FROM generate_series(1, %(media)s) AS g;

WITH m AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM dharma.media_files),
h AS (  -- finished rows, spread evenly over the past year
    SELECT g, now() - interval '1 hour'
              - make_interval(secs => 365 * 86400 * (1 - g::float8 / %(history)s)) AS t
    FROM generate_series(1, %(history)s) AS g
)
INSERT INTO dharma.stt_jobs (media_id, status, created_at, run_after, processing_started_at,
                             finished_at, attempts, failure_reason, error_message, progress)
SELECT m.id,
       CASE WHEN g %% 100 < 90 THEN 'completed' WHEN g %% 100 < 97 THEN 'failed'
            ELSE 'cancelled' END,
       t, t, t + interval '10 minutes', t + interval '20 minutes',
       1 + g %% 2,
       CASE WHEN g %% 100 BETWEEN 90 AND 96 THEN 'runner_error_permanent' END,
       CASE WHEN g %% 100 BETWEEN 90 AND 96 THEN 'source is not readable media' END,
       1
FROM h
JOIN m ON m.n = 1 + g %% %(media)s;

WITH m AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM dharma.media_files)
INSERT INTO dharma.stt_jobs (media_id, status, priority, run_after, attempts)
SELECT m.id, 'pending', CASE WHEN g %% 10 = 0 THEN 1 ELSE 0 END,
       CASE WHEN g %% 5 = 0 THEN now() + interval '10 minutes'
            ELSE now() - make_interval(secs => g) END,
       CASE WHEN g %% 5 = 0 THEN 1 ELSE 0 END
FROM generate_series(1, %(pending)s) AS g
JOIN m ON m.n = 1 + g %% %(media)s;

WITH m AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM dharma.media_files)
INSERT INTO dharma.stt_jobs (media_id, status, processing_started_at, attempts, claimed_by,
                             runner_name)
SELECT m.id, 'processing', now(), 1, 'bench', 'dharma-stt-' || g || '-1'
FROM generate_series(1, %(processing)s) AS g
JOIN m ON m.n = 1 + g %% %(media)s;
"""


@dataclass(frozen=True)
class Figure:
    name: str
    rows: int
    median_ms: float
    buffers: int
    access: str


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def _access(plan: dict[str, Any]) -> str:
    """The scans of a plan, e.g. "Index Scan stt_jobs_claim_idx" — what decides its cost."""
    scans = []
    for node in _plan_nodes(plan):
        kind = node["Node Type"]
        if "Scan" in kind and "Relation Name" in node:
            index = node.get("Index Name")
            scans.append(f"{kind} {index}" if index else f"{kind} {node['Relation Name']}")
    return ", ".join(dict.fromkeys(scans)) or "-"


def _buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0)) + int(plan.get("Shared Read Blocks", 0))


@contextlib.contextmanager
def _rolled_back(conn: Any) -> Iterator[Any]:
    """A cursor in a transaction that is always rolled back: the queue stays as built."""
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.rollback()


Statements = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Case:
    name: str
    statements: Statements
    #: Run first in the same transaction, untimed (e.g. drop an index: DDL rolls back too).
    setup: tuple[str, ...] = ()
    #: Statements whose rows are not counted (the claim's advisory lock).
    uncounted: int = 0


def measure(conn: Any, case: Case, repeat: int) -> tuple[Figure, str]:
    """Median client-side wall time of running the case's statements in one (rolled back)
    transaction, plus the summed buffers and access paths from EXPLAIN ANALYZE of them, and
    the plan text of the last."""
    statements = case.statements
    times = []
    rows = 0
    for _ in range(repeat):
        with _rolled_back(conn) as cur:
            for sql in case.setup:
                cur.execute(sql)
            start = time.perf_counter()
            rows = 0
            for index, (sql, params) in enumerate(statements):
                cur.execute(sql, params)
                if index >= case.uncounted:
                    rows += max(cur.rowcount, 0)
            times.append((time.perf_counter() - start) * 1000)
    buffers = 0
    access: list[str] = []
    text = ""
    with _rolled_back(conn) as cur:
        for sql in case.setup:
            cur.execute(sql)
        for sql, params in statements:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql, params)
            plan = cur.fetchone()[0][0]["Plan"]
            buffers += _buffers(plan)
            access.append(_access(plan))
    with _rolled_back(conn) as cur:
        for sql in case.setup:
            cur.execute(sql)
        sql, params = statements[-1]
        cur.execute("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, params)
        text = "\n".join(line for (line,) in cur.fetchall())
    return Figure(case.name, rows, statistics.median(times), buffers,
                  "; ".join(dict.fromkeys(access))), text  # fmt: skip


def build(db: Database, history: int, pending: int, processing: int) -> None:
    media = max(1, min(history // 3, 50_000))
    with contextlib.closing(db.connect()) as conn, conn.cursor() as cur:
        cur.execute(POPULATE, {"history": max(history, 1), "pending": pending,
                               "processing": processing, "media": media})  # fmt: skip
        if history == 0:
            cur.execute("DELETE FROM dharma.stt_jobs WHERE status IN "
                        "('completed', 'failed', 'cancelled')")  # fmt: skip
        cur.execute("VACUUM ANALYZE dharma.stt_jobs")
        cur.execute("VACUUM ANALYZE dharma.media_files")


def run_size(factory: DatabaseFactory, history: int, args: argparse.Namespace) -> None:
    db = factory.create()
    try:
        started = time.monotonic()
        build(db, history, args.pending, args.processing)
        print(f"\n== {history:,} historical rows, {args.pending:,} pending "
              f"({args.pending // 5:,} backing off), {args.processing} processing "
              f"(built in {time.monotonic() - started:.1f} s) ==")  # fmt: skip
        conn = db.connect()
        conn.autocommit = False
        try:
            report(conn, args)
        finally:
            conn.close()
    finally:
        factory.drop(db)


def report(conn: Any, args: argparse.Namespace) -> None:
    batch = args.batch
    cap = args.processing + batch  # room for exactly one full batch
    claim = [(Q["claim_lock"], {"lock_key": CLAIM_LOCK_KEY}),
             (Q["claim"], {"worker": "bench", "batch": batch, "max_in_flight": cap})]  # fmt: skip
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM dharma.stt_jobs WHERE status = 'processing' LIMIT 1")
        (some_processing,) = cur.fetchone()
    conn.rollback()
    fence = {"job_id": some_processing, "attempt": 1}
    no_queue_indexes = tuple(
        f"DROP INDEX dharma.{index}"
        for index in (
            "stt_jobs_claim_idx",
            "stt_jobs_due_idx",
            "stt_jobs_processing_idx",
            "stt_jobs_live_media_idx",
        )
    )
    cases = [
        Case(f"claim ({batch} rows, one statement)", claim, uncounted=1),
        Case(f"naive claim, {batch} statements", [(NAIVE_CLAIM, {})] * batch),
        Case(
            f"naive claim, {batch} statements, seed schema (no queue indexes)",
            [(NAIVE_CLAIM, {})] * batch,
            setup=no_queue_indexes,
        ),
        Case("inflight (every pass)", [(Q["inflight"], {"owner": None})]),
        Case("next_due (every pass)", [(Q["next_due"], {})]),
        Case("oldest_pending_age (gauge)", [(Q["oldest_pending_age"], {})]),
        Case("queue_depth (gauge): live statuses", [(Q["queue_depth_live"], {})]),
        Case(
            "queue_depth: finished, estimated (> 100k rows)",
            [(Q["queue_depth_finished_estimate"], {})],
        ),
        Case("queue_depth: finished, exact (<= 100k rows)", [(Q["queue_depth_finished"], {})]),
        Case("queue_depth before issue 11: one count by status", [(QUEUE_DEPTH_BEFORE, {})]),
        Case("record_success (fenced)", [(Q["record_success"], fence)]),
        Case("status page: in flight", [(Q["status_inflight"], {"limit": 200})]),
        Case(
            "status page: failures, 24 h, limit 20",
            [(Q["status_failures"], {"window": 86400, "limit": 20})],
        ),
        Case(
            "status page: throughput, last hour",
            [(Q["status_throughput"], {"window": 3600, "bucket": 300, "buckets": 12})],
        ),
    ]
    figures = []
    plans = {}
    for case in cases:
        figure, text = measure(conn, case, args.repeat)
        figures.append(figure)
        plans[case.name] = text
    width = max(len(f.name) for f in figures)
    print(f"{'query':<{width}}  {'rows':>5}  {'median ms':>9}  {'buffers':>7}  access path")
    for f in figures:
        print(f"{f.name:<{width}}  {f.rows:>5}  {f.median_ms:>9.2f}  {f.buffers:>7}  {f.access}")
    ours = figures[0]
    for naive in figures[1:3]:
        print(f"claim vs {naive.name}: {naive.median_ms / ours.median_ms:.1f}x faster "
              f"({ours.median_ms / max(ours.rows, 1):.3f} vs "
              f"{naive.median_ms / max(naive.rows, 1):.3f} ms per claimed row; "
              f"buffers {ours.buffers} vs {naive.buffers})")  # fmt: skip
    print("\nplan of the claim (EXPLAIN ANALYZE, BUFFERS):")
    print(plans[cases[0].name])
    if args.json:
        args.json.write(json.dumps([f.__dict__ for f in figures]) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", default="100000",
                        help="finished rows in the table; a comma list runs each size")  # fmt: skip
    parser.add_argument("--pending", type=int, default=1000)
    parser.add_argument("--processing", type=int, default=150)
    parser.add_argument("--batch", type=int, default=50, help="CLAIM_BATCH_SIZE")
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--json", type=argparse.FileType("a"), help="append figures here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.history.split(",")]
    server = PostgresServer()
    server.start()
    try:
        factory = DatabaseFactory(server)
        with contextlib.closing(server.admin()) as admin, admin.cursor() as cur:
            cur.execute("SHOW server_version")
            print(f"PostgreSQL {cur.fetchone()[0]}, CLAIM_BATCH_SIZE {args.batch}, "
                  f"median of {args.repeat} runs each")  # fmt: skip
        for history in sizes:
            run_size(factory, history, args)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
