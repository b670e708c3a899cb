-- Every query the jobrunner runs. Each write is fenced on (id, attempts, status='processing'):
-- an attempt that no longer owns the row changes nothing.

-- name: load_attempt
SELECT j.status, j.attempts, j.language, m.id, m.category_id, m.created_at, m.source_path,
       j.initial_prompt
FROM dharma.stt_jobs j
JOIN dharma.media_files m ON m.id = j.media_id
WHERE j.id = %(job_id)s;

-- name: set_progress
UPDATE dharma.stt_jobs
SET progress = %(progress)s
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing';

-- name: check_attempt
SELECT 1 FROM dharma.stt_jobs
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing';

-- name: lock_attempt
SELECT 1 FROM dharma.stt_jobs
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing'
FOR UPDATE;

-- name: lock_media
SELECT 1 FROM dharma.media_files WHERE id = %(media_id)s FOR UPDATE;

-- name: delete_subtitles
DELETE FROM dharma.subtitles WHERE media_id = %(media_id)s;

-- name: insert_subtitles
INSERT INTO dharma.subtitles (media_id, start_time_ms, end_time_ms, text) VALUES %s;

-- name: set_duration
UPDATE dharma.media_files SET duration_seconds = %(duration)s WHERE id = %(media_id)s;

-- name: mark_result
UPDATE dharma.stt_jobs SET progress = 1, result_attempt = attempts
WHERE id = %(job_id)s AND attempts = %(attempt)s AND status = 'processing';
