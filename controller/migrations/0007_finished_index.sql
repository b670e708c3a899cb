-- Dharma Stream batch schema, version 7: finished rows by finish time, for the controller's
-- status page (controller/status_page.py: recent failures, throughput over the last hour).
-- Finished rows are kept for ever, so "what finished lately" must not read the whole history:
-- this index is read backwards from now and stops at the page's window or LIMIT (a few pages
-- however long the history). Partial: live rows (finished_at NULL) are not in it.
-- Idempotent like the others (IF NOT EXISTS).
CREATE INDEX IF NOT EXISTS stt_jobs_finished_idx
    ON dharma.stt_jobs (finished_at) WHERE finished_at IS NOT NULL;
