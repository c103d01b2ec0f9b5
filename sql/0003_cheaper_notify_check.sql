-- The debounced NOTIFY of 0002, same rules and knobs, without its cost on the
-- statements that do not notify.
--
-- Under load nearly every statement ends at the global-interval check ("some statement
-- notified a moment ago"), so that check is what every write batch pays. In 0002 it
-- ran inside the PL/pgSQL trigger function, and cost about 40 us per statement more
-- than `eventgate.notify = off`, several percent of a 10-row INSERT: a call of the
-- function, a subtransaction (the BEGIN ... EXCEPTION block around parsing the
-- settings), a query starting an executor to read the sequence, and a dozen PL/pgSQL
-- expressions, each set up again in every transaction.
--
-- Here the check is the trigger's WHEN condition, one expression evaluated by the
-- executor: the function runs only for statements that may notify (`always`, or the
-- global interval has passed), and `off` no longer calls it at all. The clock is read
-- with `pg_sequence_last_value()`, which starts no executor. A setting is parsed only
-- when it is set, in `eventgate_setting_ms`, whose EXCEPTION block keeps a bad value
-- from failing writes.
--
-- The debounce UPDATE of `notified_at` stays a statement of its own inside the
-- function: it runs only on statements that passed the global check (at most ~100 a
-- second), so folding it into the per-row `last_seq` UPDATE would move a cost onto
-- every row to save one on a few statements.

-- A duration setting in milliseconds; `fallback` when unset, empty or not a duration.
CREATE OR REPLACE FUNCTION eventgate_setting_ms(name text, fallback float8) RETURNS float8
LANGUAGE plpgsql STABLE AS $$
DECLARE
    raw text := current_setting(name, true);
BEGIN
    IF raw IS NULL OR raw = '' THEN
        RETURN fallback;
    END IF;
    RETURN date_part('epoch', raw::interval) * 1000;
EXCEPTION WHEN others THEN
    RETURN fallback;
END;
$$;

-- Called only when the WHEN condition below passed.
CREATE OR REPLACE FUNCTION agent_job_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hint     record;
    always   boolean := coalesce(current_setting('eventgate.notify', true), '') = 'always';
    debounce interval;
    now_ms   float8;
BEGIN
    IF NOT always THEN
        debounce := eventgate_setting_ms('eventgate.notify_debounce', 50) * interval '1 millisecond';
        now_ms := date_part('epoch', clock_timestamp()) * 1000;
    END IF;
    FOR hint IN SELECT job_id, max(seq) AS max_seq FROM new_rows GROUP BY job_id LOOP
        IF NOT always THEN
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

DROP TRIGGER IF EXISTS agent_job_events_notify ON agent_job_events;
CREATE TRIGGER agent_job_events_notify
    AFTER INSERT ON agent_job_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (CASE coalesce(current_setting('eventgate.notify', true), '')
              WHEN 'off' THEN false
              WHEN 'always' THEN true
              -- Milliseconds since the last notification by anyone, against the
              -- global interval (10 ms unless set).
              ELSE date_part('epoch', clock_timestamp()) * 1000
                       - coalesce(pg_sequence_last_value('eventgate_notify_clock'), 0)
                   >= CASE WHEN coalesce(current_setting('eventgate.notify_global_interval', true), '') = ''
                           THEN 10
                           ELSE eventgate_setting_ms('eventgate.notify_global_interval', 10)
                      END
          END)
    EXECUTE FUNCTION agent_job_events_notify();
