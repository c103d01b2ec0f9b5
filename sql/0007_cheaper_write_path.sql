-- The write path at a lower cost per statement: the same rules as 0004 and 0006, in
-- fewer and cheaper steps.
--
-- Measured (docs/performance.md, "The write path"), a 10-row INSERT spent most of its
-- time not in PostgreSQL's own work (heap, indexes, WAL) but around it:
--   * the AFTER statement triggers: `agent_job_events_write_counters` called the SQL
--     function `eventgate_write_counters`, and the WHEN clause of
--     `agent_job_events_notify` the SQL function `eventgate_writes_quiet`. A SQL
--     function that is not inlined is parsed and planned again in every transaction
--     (its plan lives in the calling expression, which PL/pgSQL and the trigger's WHEN
--     set up anew each time), and a WHEN clause is itself read and planned again for
--     every statement;
--   * the transition table `new_rows`, filled with every inserted row for a trigger
--     that, under load, runs for few statements;
--   * the per-row trigger's own expressions.
-- Here ONE statement trigger, a PL/pgSQL function without WHEN (its queries' plans are
-- kept for the session), writes the counters back and makes the NOTIFY decision of
-- 0006 (same meter, same advisory-lock try, same per-job debounce and global interval,
-- same knobs); the hints (`job_id:max_seq`, at most one per job per statement) come
-- from the counters the seq trigger hands out, so no transition table is kept. The
-- per-row trigger does the same as in 0004 with fewer expressions.
--
-- Unchanged: seqs gap-free and in commit order per job (the job row's lock, taken by
-- the first row of a statement for that job, held to the end of the transaction);
-- lines over the whole log; ids UUIDv7 after the lock; a claimed `kind = "status"`
-- refused; one hint per job per statement at most. Only eventgate's own triggers are
-- replaced; nothing of the original system's (columns, types, keys, indexes) is
-- touched, and the foreign key stays as it is (see the docs for why it is not made
-- deferrable or NOT VALID: neither would make an INSERT cheaper).

-- The lines of a message, as 0004's, counted in bytes (a newline is one byte in UTF-8,
-- so the result is the same, without counting characters).
CREATE OR REPLACE FUNCTION eventgate_line_count(message text) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT octet_length(message) - octet_length(replace(message, E'\n', '')) + 1
$$;

-- The UUIDv7 of 0004, bit for bit the same layout, with the epoch read as float8
-- (`date_part`) rather than numeric (`extract`), which costs several times more.
CREATE OR REPLACE FUNCTION eventgate_uuid7(at timestamptz, seq bigint) RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
    SELECT (lpad(to_hex((floor(date_part('epoch', at) * 1000)::bigint << 16)
                        | 28672                                   -- 0x7000: version 7
                        | ((seq >> 24) & 4095)), 16, '0')
            || lpad(to_hex((-9223372036854775807 - 1)             -- variant 0b10
                           | ((seq & 16777215) << 38)
                           | floor(random() * 274877906944)::bigint), 16, '0'))::uuid
$$;

-- BEFORE INSERT, per row: the next seq and line of the job, as in 0004.
--
-- `eventgate.seq_cache` holds '<job id>/<last seq>/<last line>' of the job this
-- statement is numbering; the first row of a statement for a job locks the job row
-- (FOR NO KEY UPDATE: it does not conflict with the foreign key's KEY SHARE) and reads
-- its counters; later rows count on in the setting. When a statement moves on to
-- another job, the counters of the previous one are written to its row at once, and
-- its hint is kept in `eventgate.seq_hints` ('<job id>:<max seq> ...') for the
-- statement's end. Both settings are transaction-local, so a savepoint's rollback
-- rolls them back with the rows they describe, and the statement trigger below empties
-- them, so the next statement reads the job row again.
CREATE OR REPLACE FUNCTION agent_job_events_assign_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cache text := current_setting('eventgate.seq_cache', true);
    job   text := NEW.job_id::text;
    seq   bigint;
    line  bigint;
BEGIN
    IF left(cache, 36) = job THEN
        seq := split_part(cache, '/', 2)::bigint + 1;
        line := split_part(cache, '/', 3)::bigint;
    ELSE
        IF cache <> '' THEN
            UPDATE agent_jobs
               SET last_seq = split_part(cache, '/', 2)::bigint,
                   last_line = split_part(cache, '/', 3)::bigint
             WHERE id = left(cache, 36)::uuid;
            PERFORM set_config('eventgate.seq_hints',
                               coalesce(current_setting('eventgate.seq_hints', true), '')
                               || left(cache, 36) || ':' || split_part(cache, '/', 2) || ' ',
                               true);
        END IF;
        SELECT j.last_seq + 1, j.last_line INTO seq, line
          FROM agent_jobs j WHERE j.id = NEW.job_id FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'job % does not exist', NEW.job_id
                USING ERRCODE = 'foreign_key_violation';
        END IF;
        IF line IS NULL THEN
            -- An adopted job whose old events are not numbered yet: number them now.
            PERFORM eventgate_number_job(NEW.job_id);
            SELECT j.last_seq + 1, j.last_line INTO seq, line
              FROM agent_jobs j WHERE j.id = NEW.job_id;
        END IF;
    END IF;
    NEW.seq := seq;
    NEW.line := line + 1;
    -- A time left to the database (NULL, or the transaction start that `now()` gives)
    -- is the clock after the lock, so (created_at, id) follows seq.
    NEW.created_at := CASE WHEN NEW.created_at IS NULL OR NEW.created_at = now()
                           THEN clock_timestamp() ELSE NEW.created_at END;
    NEW.id := coalesce(NEW.id, eventgate_uuid7(NEW.created_at, seq));
    IF NEW.payload->>'kind' = 'status'
       AND coalesce(current_setting('eventgate.status_event', true), '') <> job THEN
        NEW.payload := NEW.payload || '{"kind": "log", "claimedKind": "status"}'::jsonb;
    END IF;
    PERFORM set_config('eventgate.seq_cache',
                       job || '/' || seq || '/' || (line + eventgate_line_count(NEW.message)),
                       true);
    RETURN NEW;
END;
$$;

-- AFTER INSERT, per statement: write the counters of the statement's last job, then
-- decide on NOTIFY as 0006's WHEN clause did and send as 0003's function did.
CREATE OR REPLACE FUNCTION agent_job_events_statement_end() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cache    text := current_setting('eventgate.seq_cache', true);
    hints    text;
    mode     text;
    now_ms   float8;
    debounce interval;
    hint     record;
BEGIN
    IF coalesce(cache, '') = '' THEN
        RETURN NULL;                                  -- no row was inserted
    END IF;
    UPDATE agent_jobs
       SET last_seq = split_part(cache, '/', 2)::bigint,
           last_line = split_part(cache, '/', 3)::bigint
     WHERE id = left(cache, 36)::uuid;
    PERFORM set_config('eventgate.seq_cache', '', true);
    hints := coalesce(current_setting('eventgate.seq_hints', true), '');
    IF hints <> '' THEN
        PERFORM set_config('eventgate.seq_hints', '', true);
    END IF;

    mode := coalesce(current_setting('eventgate.notify', true), '');
    IF mode = 'off' THEN
        RETURN NULL;
    END IF;
    now_ms := date_part('epoch', clock_timestamp()) * 1000;
    IF mode <> 'always' AND NOT (
        CASE WHEN coalesce(current_setting('eventgate.notify_global_interval', true), '') = ''
             -- The default: quiet writes notify at once (the meter of 0006, moved on by
             -- every statement), if no other notifying transaction is in flight; busy
             -- ones share one notification per 10 ms.
             THEN (CASE WHEN coalesce(current_setting('eventgate.notify_quiet_rate', true), '') = ''
                        THEN eventgate_meter_passes(700, now_ms * 1000)
                        ELSE eventgate_meter_passes(
                                 eventgate_setting_num('eventgate.notify_quiet_rate', 700),
                                 now_ms * 1000)
                   END
                   AND pg_try_advisory_xact_lock(1702260340, 6))
                  OR now_ms - coalesce(pg_sequence_last_value('eventgate_notify_clock'), 0) >= 10
             -- An explicit global interval: 0003's rule alone.
             ELSE now_ms - coalesce(pg_sequence_last_value('eventgate_notify_clock'), 0)
                  >= eventgate_setting_ms('eventgate.notify_global_interval', 10)
        END) THEN
        RETURN NULL;                                  -- the counter poll delivers it
    END IF;

    IF mode <> 'always' THEN
        debounce := eventgate_setting_ms('eventgate.notify_debounce', 50) * interval '1 millisecond';
    END IF;
    FOR hint IN
        SELECT left(h, 36)::uuid AS job_id, max(substr(h, 38)::bigint) AS max_seq
          FROM unnest(string_to_array(hints || left(cache, 36) || ':' || split_part(cache, '/', 2), ' ')) h
         WHERE h <> ''
         GROUP BY 1
    LOOP
        IF mode <> 'always' THEN
            -- The job row is already locked by this transaction (seq assignment), so
            -- this costs no wait; a HOT update of one small column.
            UPDATE agent_jobs SET notified_at = clock_timestamp()
             WHERE id = hint.job_id
               AND (notified_at IS NULL OR notified_at <= clock_timestamp() - debounce);
            CONTINUE WHEN NOT FOUND;
            PERFORM setval('eventgate_notify_clock', now_ms::bigint);
        END IF;
        PERFORM pg_notify('agent_job_events', hint.job_id::text || ':' || hint.max_seq::text);
    END LOOP;
    RETURN NULL;
END;
$$;

-- The meter of 0006 (`eventgate_writes_quiet`) as one inlinable expression: true when
-- the statements metered so far (this one included) came at less than `rate` a
-- second, bursts of 50 ms allowed; moves the meter on either way. `rate` <= 0: never.
CREATE OR REPLACE FUNCTION eventgate_meter_passes(rate float8, now_us float8) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT rate > 0
       AND setval('eventgate_write_meter',
                  least(greatest(coalesce(pg_sequence_last_value('eventgate_write_meter'), 0),
                                 now_us) + 1e6 / greatest(rate, 1e-9),
                        now_us + 100000)::bigint)
           <= now_us + 50000
$$;

DROP TRIGGER IF EXISTS agent_job_events_write_counters ON agent_job_events;
DROP TRIGGER IF EXISTS agent_job_events_notify ON agent_job_events;
DROP TRIGGER IF EXISTS agent_job_events_statement_end ON agent_job_events;
CREATE TRIGGER agent_job_events_statement_end
    AFTER INSERT ON agent_job_events
    FOR EACH STATEMENT EXECUTE FUNCTION agent_job_events_statement_end();
