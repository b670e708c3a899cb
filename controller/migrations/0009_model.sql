-- Dharma Stream batch schema, version 9: a job's own whisper model (issue 12, item 3). NULL
-- means the deployment's default (the runner's WHISPER_MODEL). A name is a key of the model
-- catalog (WHISPER_MODELS), never a path: the controller fails a job naming a model the
-- catalog lacks without starting a runner, and passes a known one to the runner, which takes
-- the file and its checksum from the catalog. The constraint keeps the name to the catalog's
-- characters (dharma_common/models.py MODEL_NAME_PATTERN), so a mistyped or hostile value is
-- refused when it is written. The controller reads the column; the runner role needs no grant
-- (the controller passes the model in the runner's environment).
-- Idempotent like the others (IF NOT EXISTS; the constraint is replaced).
ALTER TABLE dharma.stt_jobs ADD COLUMN IF NOT EXISTS model text NULL;

ALTER TABLE dharma.stt_jobs DROP CONSTRAINT IF EXISTS stt_jobs_model_name;
ALTER TABLE dharma.stt_jobs ADD CONSTRAINT stt_jobs_model_name
    CHECK (model ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$');
