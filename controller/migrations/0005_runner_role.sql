-- Dharma Stream batch schema, version 5: a database role for runners (issue 10, least
-- privilege). A runner parses untrusted media; if it is taken over it must not be able to do
-- more in the database than its own job needs. Everything it runs is in jobrunner/queries.sql:
--   load_attempt       SELECT stt_jobs (id, media_id, status, attempts, language)
--                      JOIN media_files (id, category_id, created_at, source_path)
--   set_progress, check_attempt, lock_attempt (FOR UPDATE), mark_result
--                      UPDATE stt_jobs (progress, result_attempt), fenced on id/attempts/status
--   lock_media (FOR UPDATE), set_duration
--                      UPDATE media_files (duration_seconds)
--   delete_subtitles, insert_subtitles
--                      DELETE/INSERT subtitles (ids come from an identity column: no sequence
--                      privilege is needed)
-- `SELECT ... FOR UPDATE` needs UPDATE on at least one column of the locked table: the
-- column-level UPDATE grants below are that. No status, error, attempts, claim or scheduling
-- column can be written, no other table or column read, nothing inserted into the queue.
--
-- dharma_runner is a NOLOGIN group role: logins are made by the operator and granted it (see
-- the README, "Security"):  CREATE ROLE dharma_runner_login LOGIN PASSWORD '...' IN ROLE
-- dharma_runner;  Roles are per cluster, grants per database.
--
-- Safe where the migrating user may not create roles (a managed PostgreSQL without
-- CREATEROLE): then only a NOTICE is raised and no grant is made; an administrator can
-- create the role and run the GRANTs below (or re-run this file) later. Idempotent: the role
-- is created only if missing, and its grants on these tables are reset to exactly this set.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dharma_runner') THEN
        BEGIN
            CREATE ROLE dharma_runner NOLOGIN;
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'dharma_runner not created (no CREATEROLE): runners keep the '
                    'controller''s role until an administrator creates it and grants it';
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by a migration of another database of this cluster
        END;
    END IF;

    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dharma_runner') THEN
        REVOKE ALL ON ALL TABLES IN SCHEMA dharma FROM dharma_runner;
        REVOKE ALL ON ALL SEQUENCES IN SCHEMA dharma FROM dharma_runner;
        GRANT USAGE ON SCHEMA dharma TO dharma_runner;
        GRANT SELECT (id, media_id, status, attempts, language),
              UPDATE (progress, result_attempt)
            ON dharma.stt_jobs TO dharma_runner;
        GRANT SELECT (id, category_id, created_at, source_path),
              UPDATE (duration_seconds)
            ON dharma.media_files TO dharma_runner;
        GRANT SELECT, INSERT, DELETE ON dharma.subtitles TO dharma_runner;
    END IF;
END $$;
