"""Benchmark of the controller on the test control plane: rows -> Jobs latency, Jobs per second,
duplicates, RSS and API requests per Job.

Why these figures: the controller replaces a loop that polled every 30 s, so the latency from
INSERT to Job created is the user-visible win; Jobs per second bounds how fast a backlog
drains; duplicates must be zero (one Job per attempt is the contract); RSS must stay small
while the informer caches hold thousands of Jobs and pods.

What runs (nothing simulated except the pods' containers and what they would write):

* the testbed (`scripts/testbed up`: kube-apiserver, controller-manager's Job controller,
  scheduler, etcd, KWOK playing every pod as "succeed after --pod-delay"), registered as a
  session so no other session stops it under us, released at the end;
* the runner's final fenced commit (`result_attempt`) for each of those pods once it runs,
  which the controller requires before it records success and a simulated container cannot
  make (`devtools.simulated_runner.SimulatedCommits`): the runner's write, on a connection and
  an API client of its own, so neither the controller's DB connections nor its API requests
  count it;
* a real PostgreSQL (devtools/services.py) with a migrated database of its own;
* ONE `dharma-controller run --executor kubernetes` process (`python -m controller`), running
  as a ServiceAccount with the Helm chart's Role, so its API requests are counted separately
  by the API server's priority-and-fairness metrics (flow schema `service-accounts`);
* this process: inserts rows, watches the namespace's Jobs and records the local wall-clock
  time each Job is first seen (`metadata.creationTimestamp` and managedFields times have 1 s
  resolution), samples the controller's VmRSS, and waits until every row is completed.

The set-up and tear-down of all this is `bench.harness.harness()` (the cluster side in
`bench.cluster`), shared with `bench.load` (a backlog of thousands of rows, or an hour-long
soak); the table is `bench.report`. This module is the scenario only.

Phases: a trickle (`--trickle-rows` single-row INSERT transactions at `--trickle-rate` per
second, far below the cap: the "under the cap" latency), then, once those Jobs exist, a
burst (the remaining rows in `--batch`-row INSERT transactions, back to back: the cap binds,
giving Jobs per second sustained). A row's insert time is taken just before its INSERT is
sent, so each latency includes the INSERT and its commit.

Usage: python -m bench.controller [--rows 2000] [--cap 200] [--keep-testbed]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.harness import (
    Harness,
    add_harness_arguments,
    harness,
    insert_rows,
    run_and_publish,
    status_counts,
    unfinished,
    wait_for,
)
from bench.report import Results, raw, report


def trickle(
    h: Harness, conn: Any, args: argparse.Namespace, inserted: dict[int, float]
) -> list[int]:
    """The trickle: single-row INSERT transactions at `--trickle-rate` per second, far below
    the cap; then wait for their Jobs and for the rows to complete, so the burst starts with
    nothing in flight and its first `cap` rows measure how fast the controller creates Jobs
    when the cap is free. Returns the row ids; `inserted` gets each row's insert time."""
    trickle_n = min(args.trickle_rows, args.rows)
    print(f"trickle: {trickle_n} rows, one per INSERT, {args.trickle_rate}/s", file=sys.stderr)
    trickle_ids: list[int] = []
    start = time.monotonic()
    for i in range(trickle_n):
        delay = start + i / args.trickle_rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ids, at = insert_rows(conn, 1)
        trickle_ids += ids
        inserted.update(dict.fromkeys(ids, at))

    wait_for(lambda: h.jobs_for(trickle_ids), "the trickle's Jobs", 120)
    print("waiting for the trickle's rows to complete", file=sys.stderr)
    wait_for(lambda: not unfinished(status_counts(conn)), "the trickle to drain",
             args.timeout)  # fmt: skip
    return trickle_ids


def burst(
    conn: Any, burst_n: int, batch: int, inserted: dict[int, float]
) -> tuple[list[int], float]:
    """The burst: `burst_n` rows in `batch`-row INSERT transactions, back to back (the cap
    binds). Returns the row ids and the time the burst started."""
    print(f"burst: {burst_n} rows, {batch} per INSERT, back to back", file=sys.stderr)
    burst_ids: list[int] = []
    burst_start = time.time()
    while len(burst_ids) < burst_n:
        ids, at = insert_rows(conn, min(batch, burst_n - len(burst_ids)))
        burst_ids += ids
        inserted.update(dict.fromkeys(ids, at))
    return burst_ids, burst_start


def run(args: argparse.Namespace, workdir: Path, publish: Callable[[Results], None]) -> Results:
    with harness(args, workdir) as h:
        conn = h.connect()
        inserted: dict[int, float] = {}
        trickle_ids = trickle(h, conn, args, inserted)
        burst_ids, burst_start = burst(conn, args.rows - len(trickle_ids), args.batch, inserted)
        completed_at, counts = h.wait_drained(conn, args.timeout)
        s = h.stop(conn)
        conn.close()
        notes = []
        if s.metrics_status != 200:
            notes.append(f"controller /metrics unavailable ({s.metrics_status})")
        results = Results(
            rows=args.rows, cap=args.cap, trickle_ids=trickle_ids, burst_ids=burst_ids,
            inserted=inserted, burst_start=burst_start, jobs=s.jobs, late=s.late,
            listed_jobs=s.listed_jobs, statuses=counts, attempts_over_one=s.attempts_over_one,
            completed_at=completed_at, rss_max_mib=h.sampler.max_mib(),
            rss_hwm_mib=s.rss_hwm_kib / 1024, rss_idle_mib=h.rss_idle_mib,
            api_requests=s.api_requests, api_resets=s.api_resets,
            controller_metrics=s.controller_metrics,
            load_before=h.load_before, load_after=s.load_after, controller_exit=s.exit_code,
            cpu_seconds=s.cpu_seconds, kcm_throttle=s.kcm_throttle,
            runner_commits=s.runner_commits,
            log_path=h.log_path, rss_samples=h.sampler.samples, marks=s.marks, notes=notes,
        )  # fmt: skip
        publish(results)  # before the clean-up, which may take a while
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.controller",
        description="rows -> Jobs benchmark of dharma-controller on the test control plane",
    )
    parser.add_argument("--rows", type=int, default=2000, help="rows enqueued in all")
    parser.add_argument(
        "--trickle-rows",
        type=int,
        default=200,
        help="rows inserted one per transaction, below the cap, first",
    )
    parser.add_argument("--trickle-rate", type=float, default=20.0, help="trickle rows per second")
    parser.add_argument("--batch", type=int, default=100, help="rows per INSERT in the burst")
    add_harness_arguments(parser)
    args = parser.parse_args(argv)  # fmt: skip
    if args.rows < 1 or args.cap < 1 or args.trickle_rate <= 0:
        parser.error("--rows, --cap and --trickle-rate must be positive")
    return run_and_publish("controller", args, run, report, raw)


if __name__ == "__main__":
    sys.exit(main())
