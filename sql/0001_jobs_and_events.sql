-- Jobs and their events, with per-job, gap-free, commit-ordered sequence numbers.
--
-- Every statement is idempotent: `eventgate migrate` may run this file again.

CREATE TABLE IF NOT EXISTS agent_jobs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name        text NOT NULL DEFAULT '',
    status      text NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead_letter')),
    payload     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz,
    -- The highest seq handed out for this job. The row lock taken to bump it is what
    -- orders seqs by commit: a second writer waits until the first one commits.
    last_seq    bigint NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS agent_jobs_created_at_idx ON agent_jobs (created_at DESC);

CREATE TABLE IF NOT EXISTS agent_job_events (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    job_id     uuid NOT NULL REFERENCES agent_jobs (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    level      text NOT NULL DEFAULT 'info' CHECK (level IN ('info', 'warn', 'error')),
    message    text NOT NULL,
    payload    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT agent_job_events_job_seq_key UNIQUE (job_id, seq)
);

-- BEFORE INSERT, per row: take the next seq of the job. The UPDATE locks the job row
-- until this transaction ends, so a concurrent writer of the same job waits and gets a
-- higher seq only after this one is visible: a reader that has seen seq N can never
-- later see a new row with seq <= N. Any seq the client supplies is overwritten.
CREATE OR REPLACE FUNCTION agent_job_events_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE agent_jobs SET last_seq = last_seq + 1
     WHERE id = NEW.job_id
    RETURNING last_seq INTO NEW.seq;
    IF NEW.seq IS NULL THEN
        RAISE EXCEPTION 'job % does not exist', NEW.job_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS agent_job_events_assign_seq ON agent_job_events;
CREATE TRIGGER agent_job_events_assign_seq
    BEFORE INSERT ON agent_job_events
    FOR EACH ROW EXECUTE FUNCTION agent_job_events_assign_seq();

-- AFTER INSERT, per statement: one small hint per job touched, `<job_id>:<max_seq>`.
-- Never log text: NOTIFY payloads are capped and NOTIFY takes a global lock at commit.
CREATE OR REPLACE FUNCTION agent_job_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hint record;
BEGIN
    FOR hint IN SELECT job_id, max(seq) AS max_seq FROM new_rows GROUP BY job_id LOOP
        PERFORM pg_notify('agent_job_events', hint.job_id::text || ':' || hint.max_seq::text);
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS agent_job_events_notify ON agent_job_events;
CREATE TRIGGER agent_job_events_notify
    AFTER INSERT ON agent_job_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION agent_job_events_notify();

-- BEFORE UPDATE OF status: keep the timestamps right.
CREATE OR REPLACE FUNCTION agent_jobs_status_times() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        NEW.updated_at := now();
        IF NEW.status = 'running' AND NEW.started_at IS NULL THEN
            NEW.started_at := now();
        END IF;
        IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'dead_letter') THEN
            NEW.finished_at := coalesce(NEW.finished_at, now());
        ELSE
            NEW.finished_at := NULL;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS agent_jobs_status_times ON agent_jobs;
CREATE TRIGGER agent_jobs_status_times
    BEFORE UPDATE OF status ON agent_jobs
    FOR EACH ROW EXECUTE FUNCTION agent_jobs_status_times();

-- AFTER UPDATE OF status: append a `kind = "status"` event in the same transaction, so
-- status is ordered with the logs, and tell the job list. A writer may put details of
-- the change (exit code, signal) in the session setting `eventgate.status_detail`
-- as a JSON object; they are merged into the event's payload.
CREATE OR REPLACE FUNCTION agent_jobs_status_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    detail jsonb := '{}'::jsonb;
    raw    text;
BEGIN
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        raw := current_setting('eventgate.status_detail', true);
        IF raw IS NOT NULL AND raw <> '' THEN
            BEGIN
                detail := raw::jsonb;
                IF jsonb_typeof(detail) <> 'object' THEN
                    detail := '{}'::jsonb;
                END IF;
            EXCEPTION WHEN others THEN
                detail := '{}'::jsonb;
            END;
        END IF;
        INSERT INTO agent_job_events (job_id, level, message, payload)
        VALUES (
            NEW.id,
            CASE WHEN NEW.status IN ('failed', 'dead_letter') THEN 'error'
                 WHEN NEW.status = 'cancelled' THEN 'warn'
                 ELSE 'info' END,
            'status: ' || NEW.status,
            detail || jsonb_build_object('kind', 'status', 'status', NEW.status,
                                         'previous', OLD.status)
        );
        PERFORM pg_notify('agent_job_status', NEW.id::text || ':' || NEW.status);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS agent_jobs_status_event ON agent_jobs;
CREATE TRIGGER agent_jobs_status_event
    AFTER UPDATE OF status ON agent_jobs
    FOR EACH ROW EXECUTE FUNCTION agent_jobs_status_event();

-- AFTER INSERT on jobs: the job list learns of new jobs without polling.
CREATE OR REPLACE FUNCTION agent_jobs_created_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_job_status', NEW.id::text || ':' || NEW.status);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS agent_jobs_created_notify ON agent_jobs;
CREATE TRIGGER agent_jobs_created_notify
    AFTER INSERT ON agent_jobs
    FOR EACH ROW EXECUTE FUNCTION agent_jobs_created_notify();
