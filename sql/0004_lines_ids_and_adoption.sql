-- Line numbers, time-ordered ids, seqs assigned once per statement, and the columns
-- that let eventgate adopt the original system's tables in place.
--
-- This file runs on two shapes (the runner refuses any other before it starts):
--   * eventgate's own tables (0001-0003), and
--   * the original system's `agent_jobs` / `agent_job_events` (enum `status` and
--     `level`, nullable `payload`, `updated_at`, app-made uuid4 ids, no `name`), on
--     which 0001-0003 only added triggers and `notified_at`.
-- The runner applies it in ONE transaction together with every other pending file, so
-- the original application never sees triggers without the columns they name. It only
-- adds: no column or type is dropped, renamed or retyped, and the original tables keep
-- their defaults. Existing events are numbered afterwards, job by job
-- (`eventgate_number_job`), and 0005 adds the unique index and the NOT NULL checks
-- without blocking writers.

ALTER TABLE agent_job_events ADD COLUMN IF NOT EXISTS seq bigint;
ALTER TABLE agent_job_events ADD COLUMN IF NOT EXISTS line bigint;

-- Existing jobs get NULL counters ("not numbered yet"); new ones start at 0.
ALTER TABLE agent_jobs ADD COLUMN IF NOT EXISTS last_seq bigint;
ALTER TABLE agent_jobs ALTER COLUMN last_seq SET DEFAULT 0;
-- The number of log lines of the job so far; NULL until its events are numbered.
ALTER TABLE agent_jobs ADD COLUMN IF NOT EXISTS last_line bigint;
ALTER TABLE agent_jobs ALTER COLUMN last_line SET DEFAULT 0;

-- eventgate's own table only (the original one has neither default): ids and times
-- are made by the seq trigger, after the job's lock is taken, so that they follow seq.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
                WHERE attrelid = 'agent_job_events'::regclass AND attname = 'id'
                  AND atthasdef) THEN
        ALTER TABLE agent_job_events ALTER COLUMN id DROP DEFAULT;
    END IF;
    IF (SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
          JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
         WHERE d.adrelid = 'agent_job_events'::regclass AND a.attname = 'created_at')
       = 'clock_timestamp()' THEN
        ALTER TABLE agent_job_events ALTER COLUMN created_at SET DEFAULT now();
    END IF;
END;
$$;

-- The lines of a message: its `\n`-separated parts ("a\nb" is 2, "" is 1).
CREATE OR REPLACE FUNCTION eventgate_line_count(message text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT length(message) - length(replace(message, E'\n', '')) + 1
$$;

-- A UUIDv7 whose 48-bit timestamp is `at`'s millisecond and whose next 36 bits are the
-- low bits of `seq`, so that the events of one job sort by (created_at, id) in seq
-- order even inside one millisecond; the last 38 bits are random.
CREATE OR REPLACE FUNCTION eventgate_uuid7(at timestamptz, seq bigint) RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM at) * 1000)::bigint), 12, '0')
            || to_hex(28672 | ((seq >> 24) & 4095))                  -- 0x7000: version 7
            || lpad(to_hex((-9223372036854775807 - 1)                 -- variant 0b10
                           | ((seq & 16777215) << 38)
                           | floor(random() * 274877906944)::bigint), 16, '0'))::uuid
$$;

-- Numbers the events of a job that has not been numbered yet (`last_line IS NULL`):
-- seqs where missing, in (created_at, id) order (the original system's order), and
-- lines over the whole log. Takes the job row's lock, the same lock every writer of
-- the job takes, so it is safe while the original application keeps inserting: its
-- INSERTs into this job wait for this transaction, then continue after the numbered
-- events. Does nothing for a job already numbered.
CREATE OR REPLACE FUNCTION eventgate_number_job(job uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    events bigint;
    lines  bigint;
BEGIN
    PERFORM 1 FROM agent_jobs WHERE id = job AND last_line IS NULL FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    WITH numbered AS (
        SELECT id, eventgate_line_count(message) AS parts,
               row_number() OVER w AS rn,
               sum(eventgate_line_count(message)) OVER w AS upto
          FROM agent_job_events
         WHERE job_id = job
        WINDOW w AS (ORDER BY seq, created_at, id)
    ), fixed AS (
        UPDATE agent_job_events e
           SET seq = coalesce(e.seq, n.rn), line = n.upto - n.parts + 1
          FROM numbered n
         WHERE e.job_id = job AND e.id = n.id
           AND (e.seq IS NULL OR e.line IS DISTINCT FROM n.upto - n.parts + 1)
    )
    SELECT count(*), coalesce(sum(parts), 0) INTO events, lines FROM numbered;
    UPDATE agent_jobs SET last_seq = coalesce(last_seq, events), last_line = lines
     WHERE id = job;
END;
$$;

-- The counters a statement is handing out: `eventgate.seq_cache` holds
-- '<job id>/<last seq>/<last line>/*' from the statement's first row of that job until
-- they are written to the job row (at the statement's end, or when it moves on to
-- another job); then it is ''. It is transaction-local (set_config(..., true)), so it
-- is rolled back with a savepoint, like the row it mirrors. It is trusted only inside
-- the statement that set it: the next statement reads the job row again (under the
-- lock it already holds, so cheaply), so nothing that resets settings between
-- statements (a function's SET clause) can make it stale.
CREATE OR REPLACE FUNCTION eventgate_write_counters(cache text) RETURNS void
LANGUAGE sql AS $$
    UPDATE agent_jobs
       SET last_seq = split_part(cache, '/', 2)::bigint,
           last_line = split_part(cache, '/', 3)::bigint
     WHERE id = left(cache, 36)::uuid
$$;

-- BEFORE INSERT, per row: the next seq and line of the job.
--
-- The first row of a statement for a job locks the job row (FOR NO KEY UPDATE, which
-- does not conflict with the foreign key's KEY SHARE) and reads its counters; later
-- rows of the same job count on in `eventgate.seq_cache`; the counters are written to
-- the job row once, at the end of the statement (or when the statement moves on to
-- another job). So a statement of N rows for one job costs one lock and one UPDATE of
-- the job row, not N UPDATEs of the same row (whose versions each later row had to
-- walk: quadratic). The lock lasts until the transaction ends, so a second writer of
-- the job waits and reads the counters only after this one is visible: a reader that
-- has seen seq N never later sees a new row with seq <= N.
--
-- Also: an id left to the database is a UUIDv7 built from created_at and seq; a
-- created_at left to the database (NULL, or the transaction start that `now()` gives)
-- is the clock after the lock, so (created_at, id) follows seq; a payload claiming
-- `kind = "status"` is an ordinary log line unless the status trigger wrote it.
CREATE OR REPLACE FUNCTION agent_job_events_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cache text := current_setting('eventgate.seq_cache', true);
    job   text := NEW.job_id::text;
    seq   bigint;
    line  bigint;
BEGIN
    IF left(cache, 36) = job THEN
        seq := split_part(cache, '/', 2)::bigint;
        line := split_part(cache, '/', 3)::bigint;
    ELSE
        IF cache <> '' THEN
            PERFORM eventgate_write_counters(cache);
        END IF;
        SELECT j.last_seq, j.last_line INTO seq, line
          FROM agent_jobs j WHERE j.id = NEW.job_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'job % does not exist', NEW.job_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        IF line IS NULL THEN
            -- An adopted job whose old events are not numbered yet: number them now.
            PERFORM eventgate_number_job(NEW.job_id);
            SELECT j.last_seq, j.last_line INTO seq, line
              FROM agent_jobs j WHERE j.id = NEW.job_id;
        END IF;
    END IF;
    seq := seq + 1;
    NEW.seq := seq;
    NEW.line := line + 1;
    line := line + eventgate_line_count(NEW.message);
    IF NEW.created_at IS NULL OR NEW.created_at = now() THEN
        NEW.created_at := clock_timestamp();
    END IF;
    IF NEW.id IS NULL THEN
        NEW.id := eventgate_uuid7(NEW.created_at, seq);
    END IF;
    IF NEW.payload->>'kind' = 'status'
       AND coalesce(current_setting('eventgate.status_event', true), '') <> job THEN
        NEW.payload := NEW.payload || '{"kind": "log", "claimedKind": "status"}'::jsonb;
    END IF;
    PERFORM set_config('eventgate.seq_cache', job || '/' || seq || '/' || line || '/*', true);
    RETURN NEW;
END;
$$;

-- AFTER INSERT, per statement: write the counters of the statement's last job.
CREATE OR REPLACE FUNCTION agent_job_events_write_counters() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cache text := current_setting('eventgate.seq_cache', true);
BEGIN
    PERFORM eventgate_write_counters(cache);
    PERFORM set_config('eventgate.seq_cache', '', true);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS agent_job_events_write_counters ON agent_job_events;
CREATE TRIGGER agent_job_events_write_counters
    AFTER INSERT ON agent_job_events
    FOR EACH STATEMENT
    WHEN (current_setting('eventgate.seq_cache', true) <> '')
    EXECUTE FUNCTION agent_job_events_write_counters();

-- AFTER UPDATE OF status: as in 0001, but for either shape. `status` may be the enum
-- `agentjobstatus`, and the event's `level` the enum `agentjobeventlevel`: the level is
-- made by the column's own type (jsonb_populate_record), so no cast names a type.
CREATE OR REPLACE FUNCTION agent_jobs_status_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    detail   jsonb := '{}'::jsonb;
    raw      text;
    status   text := NEW.status::text;
    previous text := OLD.status::text;
BEGIN
    IF status IS DISTINCT FROM previous THEN
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
        -- Marks the one insert allowed to carry `kind = "status"`.
        PERFORM set_config('eventgate.status_event', NEW.id::text, true);
        INSERT INTO agent_job_events (job_id, level, message, payload)
        SELECT NEW.id, r.level, 'status: ' || status,
               detail || jsonb_build_object('kind', 'status', 'status', status,
                                            'previous', previous)
          FROM jsonb_populate_record(NULL::agent_job_events, jsonb_build_object('level',
                   CASE WHEN status IN ('failed', 'dead_letter') THEN 'error'
                        WHEN status = 'cancelled' THEN 'warn'
                        ELSE 'info' END)) AS r;
        PERFORM set_config('eventgate.status_event', '', true);
        PERFORM pg_notify('agent_job_status', NEW.id::text || ':' || status);
    END IF;
    RETURN NULL;
END;
$$;

-- BEFORE UPDATE OF status: as in 0001, with the enum compared as text.
CREATE OR REPLACE FUNCTION agent_jobs_status_times() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status::text IS DISTINCT FROM OLD.status::text THEN
        NEW.updated_at := now();
        IF NEW.status::text = 'running' AND NEW.started_at IS NULL THEN
            NEW.started_at := now();
        END IF;
        IF NEW.status::text IN ('succeeded', 'failed', 'cancelled', 'dead_letter') THEN
            NEW.finished_at := coalesce(NEW.finished_at, now());
        ELSE
            NEW.finished_at := NULL;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

-- AFTER INSERT on jobs, as in 0001 (the enum printed as text).
CREATE OR REPLACE FUNCTION agent_jobs_created_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('agent_job_status', NEW.id::text || ':' || NEW.status::text);
    RETURN NULL;
END;
$$;
