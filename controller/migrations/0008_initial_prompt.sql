-- Dharma Stream batch schema, version 8: a job's own initial prompt for whisper (issue 12,
-- item 1). NULL means the runner's WHISPER_PROMPTS entry for the job's language; '' means no
-- prompt at all. whisper continues the prompt's script and punctuation style, and uses at
-- most 224 of its tokens, so it is bounded here (jobrunner/script.py MAX_PROMPT_CHARS: the
-- runner checks it again) and an over-long value is refused when it is written, not when a
-- runner picks the job up. The runner role may read it (see 0005 for the role's grants).
-- Idempotent like the others (IF NOT EXISTS; the constraint is replaced, the GRANT repeats).
ALTER TABLE dharma.stt_jobs ADD COLUMN IF NOT EXISTS initial_prompt text NULL;

ALTER TABLE dharma.stt_jobs DROP CONSTRAINT IF EXISTS stt_jobs_initial_prompt_length;
ALTER TABLE dharma.stt_jobs ADD CONSTRAINT stt_jobs_initial_prompt_length
    CHECK (char_length(initial_prompt) <= 400);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dharma_runner') THEN
        GRANT SELECT (initial_prompt) ON dharma.stt_jobs TO dharma_runner;
    END IF;
END $$;
