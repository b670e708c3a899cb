-- Dharma Stream batch schema, version 3: a re-queued job gets a fresh retry budget.
-- `attempts` cannot be reset (it is the fencing token: a stale runner of an old attempt must
-- never find its number again), so the budget counts from a base instead: the attempts a row
-- had used when an operator set it from a final status back to pending. The controller
-- retries while attempts - attempts_base < max_attempts.
-- Idempotent like the others (IF NOT EXISTS / OR REPLACE / DROP ... IF EXISTS).

ALTER TABLE dharma.stt_jobs
    ADD COLUMN IF NOT EXISTS attempts_base integer NOT NULL DEFAULT 0
    CHECK (attempts_base >= 0);

-- A trigger, not a documented two-column UPDATE: the plain `SET status = 'pending'` operators
-- (and tools) already use must do the right thing. Only a final status starts a new budget:
-- a stuck `processing` row reset to pending continues its budget, or resetting could retry a
-- job forever. The old verdict (error_message, failure_reason) is cleared unless the same
-- UPDATE sets it, so a waiting job does not show "no attempts left". run_after is left alone:
-- it is in the past for a finished row, so the row is claimable at once and keeps its age.
CREATE OR REPLACE FUNCTION dharma.requeue_stt_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.attempts_base := NEW.attempts;
    IF NEW.error_message IS NOT DISTINCT FROM OLD.error_message THEN
        NEW.error_message := NULL;
    END IF;
    IF NEW.failure_reason IS NOT DISTINCT FROM OLD.failure_reason THEN
        NEW.failure_reason := NULL;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS stt_jobs_requeue ON dharma.stt_jobs;
CREATE TRIGGER stt_jobs_requeue BEFORE UPDATE OF status ON dharma.stt_jobs
    FOR EACH ROW
    WHEN (OLD.status IN ('failed', 'cancelled', 'completed') AND NEW.status = 'pending')
    EXECUTE FUNCTION dharma.requeue_stt_job();
