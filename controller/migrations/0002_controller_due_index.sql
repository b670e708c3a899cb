-- Dharma Stream batch schema, version 2: an index for the controller's "when is the next
-- pending row due" and "how long has the oldest due row waited" questions, asked on every
-- pass; without it both scan every pending row (the claim index leads with priority).
CREATE INDEX IF NOT EXISTS stt_jobs_due_idx
    ON dharma.stt_jobs (run_after) WHERE status = 'pending';
