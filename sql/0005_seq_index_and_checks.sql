-- no-transaction
--
-- After every job's events are numbered (the runner does that between 0004 and this
-- file): the unique (job_id, seq) index and NOT NULL for the new columns, built
-- without blocking the writers. Each step below runs on its own, outside a
-- transaction, and may run again: `CREATE INDEX CONCURRENTLY` holds no lock that stops
-- INSERTs, `ADD CONSTRAINT ... NOT VALID` holds its lock for a moment, and `VALIDATE`
-- scans under a lock that lets INSERTs through. On eventgate's own table the index
-- already exists (the UNIQUE constraint of 0001) and seq is already NOT NULL.

-- A concurrent build that failed leaves an invalid index behind: drop it, build again.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                WHERE c.relname = 'agent_job_events_job_seq_key'
                  AND c.relnamespace = current_schema()::regnamespace
                  AND NOT i.indisvalid) THEN
        DROP INDEX agent_job_events_job_seq_key;
    END IF;
END;
$$;
-- step
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS agent_job_events_job_seq_key
    ON agent_job_events (job_id, seq);
-- step
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'agent_job_events'::regclass
                      AND conname = 'agent_job_events_seq_line_not_null') THEN
        ALTER TABLE agent_job_events ADD CONSTRAINT agent_job_events_seq_line_not_null
            CHECK (seq IS NOT NULL AND line IS NOT NULL) NOT VALID;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conrelid = 'agent_jobs'::regclass
                      AND conname = 'agent_jobs_counters_not_null') THEN
        ALTER TABLE agent_jobs ADD CONSTRAINT agent_jobs_counters_not_null
            CHECK (last_seq IS NOT NULL AND last_line IS NOT NULL) NOT VALID;
    END IF;
END;
$$;
-- step
ALTER TABLE agent_job_events VALIDATE CONSTRAINT agent_job_events_seq_line_not_null;
-- step
ALTER TABLE agent_jobs VALIDATE CONSTRAINT agent_jobs_counters_not_null;
