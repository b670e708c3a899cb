-- Dharma Stream batch schema, version 4: this database's installation identity.
-- One row, generated here, never by a client: the controller reads it at start-up and puts it
-- (with INSTANCE_NAME, the Helm release) into the labels, the watch selector and the name of
-- every Job it makes, so it only ever adopts, records or deletes Jobs made for this database.
-- Without it, two releases in one namespace, or a database restored to an older state (job
-- ids repeat while the old Jobs live on for ttlSecondsAfterFinished), took each other's Jobs
-- for their own.
-- Idempotent like the others; gen_random_uuid() is built in since PostgreSQL 13 (and is what
-- 0001 already uses), so nothing here needs an extension or superuser rights (Supabase).

CREATE TABLE IF NOT EXISTS dharma.installation (
    -- Always true, and the primary key: a second row cannot exist.
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id         uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO dharma.installation DEFAULT VALUES ON CONFLICT (singleton) DO NOTHING;
