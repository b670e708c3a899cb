"""The controller benchmark's figures (`bench.controller`): INSERT->Job latency percentiles,
Jobs per second with the cap free and binding, duplicates, RSS, CPU and API requests per Job,
each beside its target, and where an attempt's time goes; plus the table helpers that
`bench.load` shares.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cluster import SA_FLOW_SCHEMA, SeenJob, prometheus_value

#: What the simulated runners wrote, for the reports' notes.
RUNNER_COMMITS_NOTE = (
    "runners' final commits (result_attempt): {} — simulated for KWOK's pods "
    "(devtools/simulated_runner.py) on a DB connection and API client of their own: the "
    "runner's writes, in none of the controller's figures."
)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 200 values is the 198th)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Results:
    rows: int
    cap: int
    trickle_ids: list[int]
    burst_ids: list[int]
    inserted: dict[int, float]
    burst_start: float
    jobs: dict[str, SeenJob]
    late: set[str]
    listed_jobs: int
    statuses: dict[str, int]
    attempts_over_one: int
    completed_at: float | None
    rss_max_mib: float
    rss_hwm_mib: float
    rss_idle_mib: float
    api_requests: float | None
    #: API server restarts seen while counting (by other sessions sharing the testbed)
    api_resets: int
    controller_metrics: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    controller_exit: int | None
    cpu_seconds: float
    #: kube-controller-manager's client-side rate limiter: (seconds waited, requests)
    kcm_throttle: tuple[float, ...]
    #: The simulated runners' commits (their own writes, not the controller's)
    runner_commits: int
    log_path: Path
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    #: (Job name, stage) -> first seen (local clock; "row completed": the row's finished_at)
    marks: dict[tuple[str, str], float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def first_seen_and_duplicates(
    jobs: dict[str, SeenJob],
) -> tuple[dict[tuple[int, int], float], int]:
    """When each (job id, attempt) first had a Job, and how many Jobs beyond one any
    (job id, attempt) had (the contract: exactly one Job per attempt, so this must be 0)."""
    first_seen: dict[tuple[int, int], float] = {}
    per_key: Counter[tuple[int, int]] = Counter()
    for job in jobs.values():
        if job.key is None:
            continue
        per_key[job.key] += 1
        first_seen[job.key] = min(job.seen, first_seen.get(job.key, math.inf))
    return first_seen, sum(n - 1 for n in per_key.values() if n > 1)


def format_table(lines: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns; the first row is the header, underlined."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def report(r: Results) -> tuple[str, bool]:
    """The table (figure beside its target) and whether every target was met."""
    first_seen, duplicates = first_seen_and_duplicates(r.jobs)
    latency = {i: first_seen[(i, 1)] - t for i, t in r.inserted.items() if (i, 1) in first_seen}
    missing = len(r.inserted) - len(latency)
    trickle = [latency[i] for i in r.trickle_ids if i in latency]
    first_cap_burst = [latency[i] for i in r.burst_ids[: r.cap] if i in latency]
    overall = list(latency.values())
    burst_seen = sorted(first_seen[(i, 1)] for i in r.burst_ids if (i, 1) in first_seen)
    free = burst_seen[: r.cap]
    free_rate = len(free) / (free[-1] - r.burst_start) if free else math.nan
    bound = burst_seen[r.cap :]
    bound_rate = len(bound) / (bound[-1] - free[-1]) if bound and bound[-1] > free[-1] else math.nan
    if burst_seen:
        span = burst_seen[-1] - r.burst_start
        sustained = len(burst_seen) / span if span > 0 else math.nan
        peak = _peak_rate(burst_seen, 10.0)
    else:
        sustained = peak = math.nan
    drain = (r.completed_at - r.burst_start) if r.completed_at else math.nan
    m = r.controller_metrics
    passes = prometheus_value(m, "dharma_reconcile_passes_total")
    claims = prometheus_value(m, "dharma_claims_total")
    launch_errors = prometheus_value(m, "dharma_runner_launches_total", result="error")
    relists = prometheus_value(m, "dharma_watch_relists_total")
    total_jobs = len(r.jobs)
    api_per_job = (r.api_requests / total_jobs) if r.api_requests and total_jobs else math.nan

    ok_p99 = percentile(trickle, 99) <= 1.0
    ok_rate = free_rate >= 50
    ok_rss = r.rss_hwm_mib <= 150
    ok_dup = duplicates == 0 and total_jobs == r.rows and missing == 0
    ok_done = r.completed_at is not None and r.statuses.get("completed", 0) == r.rows

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:.0f} ms" if values else "n/a"

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        ("Metric", "Figure", "Target", ""),
        (f"INSERT->Job p50, under the cap (trickle, {len(trickle)} rows)", ms(trickle, 50), "", ""),
        (f"INSERT->Job p99, under the cap (trickle, {len(trickle)} rows)", ms(trickle, 99),
         "<= 1000 ms", mark(ok_p99)),
        (f"INSERT->Job p50, first {r.cap} rows of the burst", ms(first_cap_burst, 50), "", ""),
        (f"INSERT->Job p99, first {r.cap} rows of the burst", ms(first_cap_burst, 99), "", ""),
        (f"INSERT->Job p50, all {len(overall)} rows", ms(overall, 50), "", ""),
        (f"INSERT->Job p99, all {len(overall)} rows", ms(overall, 99), "", ""),
        (f"Jobs created/s, cap free (burst's first {len(free)} rows)", f"{free_rate:.1f}",
         ">= 50", mark(ok_rate)),
        (f"Jobs created/s, cap binding (burst's other {len(bound)} rows)", f"{bound_rate:.1f}",
         ">= 50", "bound by testbed" if bound_rate < 50 else "ok"),
        (f"Jobs created/s, whole burst of {len(burst_seen)} / best 10 s window",
         f"{sustained:.1f} / {peak:.1f}", "", ""),
        ("Burst drained (INSERT to last row completed)", f"{drain:.1f} s", "", ""),
        ("Duplicate Jobs (per job id+attempt > 1)", str(duplicates), "0", mark(ok_dup)),
        ("Jobs seen / listed at end / rows", f"{total_jobs} / {r.listed_jobs} / {r.rows}",
         "= rows", mark(ok_dup)),
        ("Rows completed (attempts > 1)",
         f"{r.statuses.get('completed', 0)} ({r.attempts_over_one})", f"{r.rows} (0)",
         mark(ok_done)),
        ("Controller RSS max (sampled VmRSS / VmHWM)",
         f"{r.rss_max_mib:.0f} / {r.rss_hwm_mib:.0f} MiB", "<= 150 MB", mark(ok_rss)),
        ("Controller RSS when idle after sync", f"{r.rss_idle_mib:.0f} MiB", "", ""),
        ("Controller CPU time (user+system)", f"{r.cpu_seconds:.1f} s", "", ""),
        ("kube-controller-manager rate-limiter wait / requests",
         f"{r.kcm_throttle[0]:.0f} s / {r.kcm_throttle[1]:.0f}", "", ""),
        ("API requests by the controller per Job", f"{api_per_job:.2f}", "", ""),
        ("Controller passes / claims / launch errors / relists",
         f"{passes:.0f} / {claims:.0f} / {launch_errors:.0f} / {relists:.0f}", "", ""),
        ("Load average 1/5/15 min before -> after",
         f"{format_load(r.load_before)} -> {format_load(r.load_after)} "
         f"({os.cpu_count()} CPUs)", "", ""),
    ]  # fmt: skip
    lines += _breakdown(r)
    out = format_table(lines)
    notes = list(r.notes)
    if missing:
        notes.append(f"{missing} rows have no Job seen by the watch")
    if r.late:
        notes.append(f"{len(r.late)} Jobs were first seen by a relist (their time is late)")
    if r.controller_exit not in (0, None):
        notes.append(f"controller exit status {r.controller_exit}")
    notes.append("Job time: local wall clock when this process's watch first saw the Job "
                 "(creationTimestamp has 1 s resolution); INSERT time: just before the INSERT "
                 "was sent.")  # fmt: skip
    notes.append(f"API requests: apiserver_flowcontrol_dispatched_requests_total"
                 f"{{flow_schema={SA_FLOW_SCHEMA!r}}} delta (the controller's ServiceAccount)"
                 f" = {r.api_requests:.0f}, watches and lists included; API server restarts "
                 f"during the run (other sessions' tests): {r.api_resets}.")  # fmt: skip
    notes.append(RUNNER_COMMITS_NOTE.format(r.runner_commits))
    notes.append(f"controller log: {r.log_path}")
    out += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(out), ok_p99 and ok_rate and ok_rss and ok_dup and ok_done


STAGES = ("job", "pod created", "pod scheduled", "pod running", "pod finished", "job complete",
          "row completed")  # fmt: skip


def _breakdown(r: Results) -> list[tuple[str, str, str, str]]:
    """Median and p99 of each step of an attempt's life, burst rows only (where time goes
    when the cap binds; this is what bounds Jobs per second: cap / attempt cycle)."""
    # Job names end in `-<job id>-<attempt>` (before it: the prefix and the instance hash).
    burst = {str(i) for i in r.burst_ids}
    names = sorted({n for n, _ in r.marks if n.endswith("-1") and n.split("-")[-2] in burst})
    rows = []
    for before, after in itertools.pairwise(STAGES):
        deltas = [r.marks[(n, after)] - r.marks[(n, before)] for n in names
                  if (n, before) in r.marks and (n, after) in r.marks]  # fmt: skip
        if deltas:
            rows.append((f"  burst: {before} -> {after} (p50 / p99)",
                         f"{percentile(deltas, 50):.2f} / {percentile(deltas, 99):.2f} s",
                         "", ""))  # fmt: skip
    return rows


def _peak_rate(times: list[float], window: float) -> float:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        best = max(best, i - j + 1)
    return best / window


def format_load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def raw(r: Results) -> dict[str, Any]:
    seen: defaultdict[str, list[float]] = defaultdict(list)
    for job in r.jobs.values():
        seen[job.name].append(job.seen)
    return {
        "rows": r.rows, "cap": r.cap, "inserted": r.inserted, "burst_start": r.burst_start,
        "trickle_ids": r.trickle_ids, "job_seen": seen, "statuses": r.statuses,
        "rss_samples_kib": r.rss_samples,
        "marks": [[name, stage, at] for (name, stage), at in r.marks.items()],
        "api_requests": r.api_requests, "api_resets": r.api_resets,
        "load_before": r.load_before, "load_after": r.load_after,
    }  # fmt: skip
