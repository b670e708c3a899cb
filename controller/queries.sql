-- Every statement the controller runs, by name (loaded by controller/store.py).
-- Every status change is fenced on (id, attempts, status = 'processing'): an attempt the
-- controller no longer owns — cancelled, retried, finished — is never touched.

-- name: claim_lock
-- Serialises claimers (replicas, or a replica and a manual run) for the rest of the claim
-- transaction, so the in-flight count they read cannot be stale: the cap is global.
SELECT pg_advisory_xact_lock(%(lock_key)s);

-- name: claim
-- One statement: count what is in flight, pick due candidates (priority first, then the
-- longest-waiting), lock them skipping rows another transaction holds, and claim them. The
-- candidate set is MATERIALIZED so LIMIT applies once to a locked set instead of being
-- re-evaluated per row as `id IN (SELECT ... LIMIT n)` may be. No attempt filter: a pending
-- row always has budget left (a retry is planned only while attempts - attempts_base <
-- max_attempts, and a re-queue from a final status sets attempts_base, migration 0003).
-- One run per media (issue 10, defect 11): a pending row is a candidate only when no row of
-- its media is processing and no older (lower id) row of its media is pending, so two jobs
-- of one media never run at once (their files and subtitles would mix) and a media's jobs
-- run in insertion order (the last request's result stands). Claimers hold claim_lock, so
-- this statement's snapshot sees every earlier claim. Held rows simply wait; other media
-- are not held up. Index: stt_jobs_live_media_idx (migration 0006).
WITH capacity AS (
    SELECT GREATEST(0, LEAST(%(batch)s::int, %(max_in_flight)s::int - count(*)::int)) AS n
    FROM dharma.stt_jobs
    WHERE status = 'processing'
), candidates AS MATERIALIZED (
    SELECT id
    FROM dharma.stt_jobs AS p
    WHERE status = 'pending' AND run_after <= now()
      AND NOT EXISTS (
          SELECT 1 FROM dharma.stt_jobs AS o
          WHERE o.media_id = p.media_id AND o.status IN ('pending', 'processing')
            AND (o.status = 'processing' OR o.id < p.id))
    ORDER BY priority DESC, run_after, id
    LIMIT (SELECT n FROM capacity)
    FOR UPDATE SKIP LOCKED
)
UPDATE dharma.stt_jobs AS j
SET status = 'processing',
    attempts = j.attempts + 1,
    processing_started_at = now(),
    claimed_by = %(worker)s,
    progress = NULL,
    runner_name = NULL,
    finished_at = NULL
FROM candidates AS c
WHERE j.id = c.id
RETURNING j.id, j.media_id, j.status, j.attempts, j.max_attempts, j.runner_name,
          j.result_attempt, j.memory_limit, j.processing_started_at, j.claimed_by,
          j.attempts_base;

-- name: inflight
-- The rows this controller owns: every processing row (Kubernetes: the leader adopts them
-- all), or only those it claimed itself (local executor: it can see only its own children).
SELECT id, media_id, status, attempts, max_attempts, runner_name, result_attempt,
       memory_limit, processing_started_at, claimed_by, attempts_base
FROM dharma.stt_jobs
WHERE status = 'processing' AND (%(owner)s::text IS NULL OR claimed_by = %(owner)s::text)
ORDER BY id;

-- name: abandoned
-- Local executor: rows claimed by another controller so long ago that its runner must have
-- been killed by that controller's deadline; nobody else will ever finish them.
SELECT id, media_id, status, attempts, max_attempts, runner_name, result_attempt,
       memory_limit, processing_started_at, claimed_by, attempts_base
FROM dharma.stt_jobs
WHERE status = 'processing'
  AND claimed_by IS DISTINCT FROM %(owner)s::text
  AND processing_started_at < now() - make_interval(secs => %(older_than)s)
ORDER BY id;

-- name: ownership
-- Who owns the rows of runners still alive (stale runners are stopped).
SELECT id, status, attempts
FROM dharma.stt_jobs
WHERE id = ANY(%(ids)s);

-- name: set_runner_name
UPDATE dharma.stt_jobs
SET runner_name = %(runner_name)s
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing';

-- name: record_success
-- Only over the runner's committed result (its final fenced transaction sets result_attempt):
-- a runner that merely exited 0 proves nothing.
UPDATE dharma.stt_jobs
SET status = 'completed', finished_at = now(), progress = 1,
    error_message = NULL, failure_reason = NULL
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing'
  AND result_attempt = %(attempt)s;

-- name: record_failure
-- Never over a committed result: the pass may have read the row just before the runner
-- committed and exited; the next pass records the success.
UPDATE dharma.stt_jobs
SET status = 'failed', finished_at = now(),
    error_message = %(message)s, failure_reason = %(reason)s
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing'
  AND result_attempt IS DISTINCT FROM %(attempt)s;

-- name: record_retry
-- Back to pending (the trigger's NOTIFY wakes every controller; the row is claimable once
-- run_after has passed). The message stays visible while the job waits.
UPDATE dharma.stt_jobs
SET status = 'pending',
    run_after = now() + make_interval(secs => %(delay)s),
    error_message = %(message)s, failure_reason = %(reason)s,
    memory_limit = COALESCE(%(memory_limit)s, memory_limit)
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing'
  AND result_attempt IS DISTINCT FROM %(attempt)s;

-- name: queue_depth
SELECT status, count(*) FROM dharma.stt_jobs GROUP BY status;

-- name: oldest_pending_age
-- Seconds the longest-waiting claimable row has waited (0 when none).
SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(run_after)), 0)::float8
FROM dharma.stt_jobs
WHERE status = 'pending' AND run_after <= now();

-- name: next_due
-- Seconds until the next pending row becomes claimable (<= 0: now; NULL: none pending).
-- A row held behind another run of its media (see claim) does not count: it becomes
-- claimable when that run ends, which this controller records itself (or a NOTIFY reports),
-- so counting it would only make the loop spin while that run lasts.
SELECT EXTRACT(EPOCH FROM min(run_after) - now())::float8
FROM dharma.stt_jobs AS p
WHERE status = 'pending'
  AND NOT EXISTS (
      SELECT 1 FROM dharma.stt_jobs AS o
      WHERE o.media_id = p.media_id AND o.status IN ('pending', 'processing')
        AND (o.status = 'processing' OR o.id < p.id));

-- name: installation
-- This database's identity (migration 0004): part of every Job's instance label and name.
SELECT id FROM dharma.installation;
