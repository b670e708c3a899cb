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
          j.attempts_base, j.model;

-- name: inflight
-- The rows this controller owns: every processing row (Kubernetes: the leader adopts them
-- all), or only those it claimed itself (local executor: it can see only its own children).
SELECT id, media_id, status, attempts, max_attempts, runner_name, result_attempt,
       memory_limit, processing_started_at, claimed_by, attempts_base, model
FROM dharma.stt_jobs
WHERE status = 'processing' AND (%(owner)s::text IS NULL OR claimed_by = %(owner)s::text)
ORDER BY id;

-- name: abandoned
-- Local executor: rows claimed by another controller so long ago that its runner must have
-- been killed by that controller's deadline; nobody else will ever finish them.
SELECT id, media_id, status, attempts, max_attempts, runner_name, result_attempt,
       memory_limit, processing_started_at, claimed_by, attempts_base, model
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

-- name: queue_depth_live
-- The live statuses, exactly: each count reads only its partial index (a handful of pages
-- however long the history). Also the table's estimated size, to choose how to count the rest.
SELECT (SELECT count(*) FROM dharma.stt_jobs WHERE status = 'pending'),
       (SELECT count(*) FROM dharma.stt_jobs WHERE status = 'processing'),
       (SELECT reltuples::float8 FROM pg_class WHERE oid = 'dharma.stt_jobs'::regclass);

-- name: queue_depth_finished
-- Finished rows, exactly: a sequential scan, so only while the table is small.
SELECT status, count(*) FROM dharma.stt_jobs
WHERE status IN ('completed', 'failed', 'cancelled') GROUP BY status;

-- name: queue_depth_finished_estimate
-- Finished rows on a long history, from the planner's statistics (ANALYZE, which autovacuum
-- runs as the table changes): the table's size times each status's sampled frequency.
-- Counting them exactly was the one controller query that grew with history (121 ms at 1M
-- rows, bench/queries.py); a gauge of history does not need to be exact to the row.
SELECT v.status, round(c.reltuples * v.freq)::bigint
FROM pg_class AS c,
     pg_stats AS s,
     unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, freq)
WHERE c.oid = 'dharma.stt_jobs'::regclass
  AND s.schemaname = 'dharma' AND s.tablename = 'stt_jobs' AND s.attname = 'status'
  AND v.status IN ('completed', 'failed', 'cancelled');

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

-- ---------------------------------------------------------------------------------------
-- `dharma-controller jobs ...` (controller/jobs_cli.py): the operators' commands. They never
-- touch a row in flight except to cancel it, and each status change is one UPDATE fenced on
-- the statuses it may start from, so a row that moved on meanwhile is left alone.

-- name: jobs_list
-- Newest first. Each filter is off when its parameter is NULL. The age comes from the
-- database's clock, as every other time on the row.
SELECT j.id, j.media_id, m.category_id, j.status, j.progress, j.attempts, j.attempts_base,
       j.max_attempts, j.priority, j.runner_name, j.failure_reason, j.created_at,
       EXTRACT(EPOCH FROM now() - j.created_at)::float8 AS age_seconds
FROM dharma.stt_jobs AS j
JOIN dharma.media_files AS m ON m.id = j.media_id
WHERE (%(statuses)s::text[] IS NULL OR j.status = ANY(%(statuses)s::text[]))
  AND (%(media_id)s::uuid IS NULL OR j.media_id = %(media_id)s::uuid)
  AND (%(category)s::text IS NULL OR m.category_id = %(category)s::text)
  AND (%(reason)s::text IS NULL OR j.failure_reason = %(reason)s::text)
  AND (%(since)s::timestamptz IS NULL OR j.created_at >= %(since)s::timestamptz)
ORDER BY j.created_at DESC, j.id DESC
LIMIT %(limit)s;

-- name: jobs_show
SELECT j.id, j.media_id, j.status, j.priority, j.progress, j.language, j.model,
       j.initial_prompt, j.attempts,
       j.attempts_base, j.max_attempts, j.result_attempt, j.runner_name, j.claimed_by,
       j.memory_limit, j.error_message, j.failure_reason, j.created_at, j.updated_at,
       j.run_after, j.processing_started_at, j.finished_at,
       EXTRACT(EPOCH FROM now() - j.created_at)::float8 AS age_seconds,
       m.title, m.category_id, m.source_path, m.duration_seconds
FROM dharma.stt_jobs AS j
JOIN dharma.media_files AS m ON m.id = j.media_id
WHERE j.id = %(job_id)s;

-- name: jobs_of_media
-- Every job of one media, oldest first: the media's history of runs.
SELECT id, status, attempts, attempts_base, max_attempts, failure_reason, created_at,
       finished_at
FROM dharma.stt_jobs
WHERE media_id = %(media_id)s
ORDER BY id;

-- name: jobs_media_state
-- Does the media exist, and which of its jobs are live (one run per media: migration 0006)?
SELECT m.id,
       ARRAY(SELECT j.id FROM dharma.stt_jobs AS j
             WHERE j.media_id = m.id AND j.status IN ('pending', 'processing')
             ORDER BY j.id) AS live_jobs
FROM dharma.media_files AS m
WHERE m.id = %(media_id)s;

-- name: jobs_backfill_candidates
-- Media a backfill would enqueue: in the category (if given), without subtitles (if asked:
-- no subtitle rows and no completed run — a talk with no speech completes with none, and
-- must not be picked again every time), and never one with a live job. Newest media first.
SELECT m.id
FROM dharma.media_files AS m
WHERE (%(category)s::text IS NULL OR m.category_id = %(category)s::text)
  AND (NOT %(without_subtitles)s
       OR (NOT EXISTS (SELECT 1 FROM dharma.subtitles AS s WHERE s.media_id = m.id)
           AND NOT EXISTS (SELECT 1 FROM dharma.stt_jobs AS c
                           WHERE c.media_id = m.id AND c.status = 'completed')))
  AND NOT EXISTS (SELECT 1 FROM dharma.stt_jobs AS j
                  WHERE j.media_id = m.id AND j.status IN ('pending', 'processing'))
ORDER BY m.created_at DESC, m.id;

-- name: jobs_enqueue_lock
-- Serialises enqueuers of this command, so two backfills started together cannot both find
-- a media without a live job and enqueue it twice.
SELECT pg_advisory_xact_lock(%(lock_key)s);

-- name: jobs_enqueue
-- One job per given media, in the given order (ids follow it, and the claim takes equal
-- priorities oldest first), skipping media that are gone or got a live job meanwhile.
INSERT INTO dharma.stt_jobs (media_id, priority, language, model, initial_prompt)
SELECT m.id, %(priority)s, %(language)s, %(model)s, %(initial_prompt)s
FROM unnest(%(media_ids)s::uuid[]) WITH ORDINALITY AS c(id, n)
JOIN dharma.media_files AS m ON m.id = c.id
WHERE NOT EXISTS (SELECT 1 FROM dharma.stt_jobs AS j
                  WHERE j.media_id = m.id AND j.status IN ('pending', 'processing'))
ORDER BY c.n
RETURNING id, media_id;

-- name: jobs_retry
-- Back to pending from an allowed final status; the trigger of migration 0003 starts a fresh
-- retry budget (attempts_base) and clears the old verdict; attempts is never reset. Refused
-- while another job of the media is live (one run per media). The row is locked first, so
-- the status reported is the one the UPDATE started from.
WITH old AS (
    SELECT id, status FROM dharma.stt_jobs WHERE id = %(job_id)s FOR UPDATE
)
UPDATE dharma.stt_jobs AS j
SET status = 'pending', progress = NULL
FROM old
WHERE j.id = old.id AND j.status = ANY(%(allowed)s::text[])
  AND NOT EXISTS (SELECT 1 FROM dharma.stt_jobs AS o
                  WHERE o.media_id = j.media_id AND o.id <> j.id
                    AND o.status IN ('pending', 'processing'))
RETURNING old.status, j.attempts, j.attempts_base, j.max_attempts;

-- name: jobs_cancel
-- Pending or processing -> cancelled; the controller stops the attempt's runner (its fenced
-- writes then find the row no longer theirs).
WITH old AS (
    SELECT id, status FROM dharma.stt_jobs WHERE id = %(job_id)s FOR UPDATE
)
UPDATE dharma.stt_jobs AS j
SET status = 'cancelled', finished_at = now()
FROM old
WHERE j.id = old.id AND j.status IN ('pending', 'processing')
RETURNING old.status, j.attempts;

-- name: jobs_refusal
-- Why a retry or cancel did not apply: the row's status and its media's other live jobs.
SELECT j.status,
       ARRAY(SELECT o.id FROM dharma.stt_jobs AS o
             WHERE o.media_id = j.media_id AND o.id <> j.id
               AND o.status IN ('pending', 'processing')
             ORDER BY o.id) AS live_siblings
FROM dharma.stt_jobs AS j
WHERE j.id = %(job_id)s;

-- ---------------------------------------------------------------------------------------
-- The status page (controller/status_page.py, STATUS_PAGE_ENABLED): read-only, all in one
-- short READ ONLY transaction per request (with queue_depth_* and oldest_pending_age above).
-- Each reads an index of its own, so a page costs the same on a year of history: live rows
-- through their partial indexes, finished ones through stt_jobs_finished_idx (migration 0007)
-- bounded by a window on finished_at and a LIMIT.

-- name: status_inflight
-- Rows in flight with their media (stt_jobs_processing_idx: at most MAX_CONCURRENT_JOBS).
SELECT j.id, j.media_id, m.title, m.category_id, j.attempts, j.attempts_base, j.max_attempts,
       j.progress, j.runner_name, j.claimed_by,
       EXTRACT(EPOCH FROM now() - j.processing_started_at)::float8 AS running_seconds
FROM dharma.stt_jobs AS j
JOIN dharma.media_files AS m ON m.id = j.media_id
WHERE j.status = 'processing'
ORDER BY j.id
LIMIT %(limit)s;

-- name: status_failures
-- The latest failures, newest first, within the window (stt_jobs_finished_idx read
-- backwards: it stops after LIMIT rows).
SELECT j.id, j.media_id, m.title, j.failure_reason, j.error_message, j.attempts,
       j.attempts_base, j.max_attempts, j.runner_name,
       EXTRACT(EPOCH FROM now() - j.finished_at)::float8 AS ago_seconds
FROM dharma.stt_jobs AS j
JOIN dharma.media_files AS m ON m.id = j.media_id
WHERE j.status = 'failed' AND j.finished_at >= now() - make_interval(secs => %(window)s)
ORDER BY j.finished_at DESC
LIMIT %(limit)s;

-- name: status_throughput
-- Completed and failed rows per interval of the window, by when they finished (bucket 0:
-- the latest interval). Intervals with none are not returned.
SELECT LEAST(floor(EXTRACT(EPOCH FROM now() - finished_at) / %(bucket)s)::int,
             %(buckets)s::int - 1) AS bucket,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM dharma.stt_jobs
WHERE finished_at >= now() - make_interval(secs => %(window)s)
  AND status IN ('completed', 'failed')
GROUP BY 1
ORDER BY 1;
