-- Dharma Stream batch schema, version 6: one run per media (issue 10, defect 11).
-- The claim (controller/queries.sql) takes a pending row only when no row of its media is
-- processing and no older row of its media is pending; `next_due` asks the same. That
-- question must not read a media's whole history (finished rows are kept for ever), so it
-- gets an index of the live rows only: a handful per media, whatever the table's size.
-- A UNIQUE index on processing rows was considered and left out on purpose: on an upgrade
-- it would fail while two runs of one media are still in flight (the very state this
-- version ends), and the claim is the only statement that makes a row processing.
-- Idempotent like the others (IF NOT EXISTS).
CREATE INDEX IF NOT EXISTS stt_jobs_live_media_idx
    ON dharma.stt_jobs (media_id, id) WHERE status IN ('pending', 'processing');
