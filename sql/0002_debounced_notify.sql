-- Past the NOTIFY lock: notify rarely, and let the gateway's counter poll deliver.
--
-- PostgreSQL takes a cluster-wide lock at the commit of every transaction that issued
-- NOTIFY and holds it through the WAL flush, so a NOTIFY per write batch caps the whole
-- database at a few thousand batches per second. Here a statement notifies only when
--   * its job's last notification is older than `eventgate.notify_debounce`
--     (default 50 ms), and
--   * no statement of ANY job notified in the last `eventgate.notify_global_interval`
--     (default 10 ms; kept in a sequence, which is not transactional, so writers never
--     wait on each other for it).
-- So an idle system still wakes the gateway in under a millisecond, and a busy one
-- sends at most ~100 notifications a second whatever its write rate. The gateway
-- delivers the rest with one query over the counters (`agent_jobs.last_seq`) of the jobs
-- it serves, on a short timer (`--counter-poll`, 25 ms): that timer bounds the delay.
--
-- Knobs, per session, role or database (`ALTER DATABASE ... SET ...`):
--   eventgate.notify = 'off'     no NOTIFY at all (bulk writers; the counter poll delivers)
--   eventgate.notify = 'always'  one NOTIFY per statement per job (the old behaviour)
--   eventgate.notify_debounce = '250ms'          the per-job interval
--   eventgate.notify_global_interval = '0'       the global interval (0: per-job only)

ALTER TABLE agent_jobs ADD COLUMN IF NOT EXISTS notified_at timestamptz;

-- Milliseconds since the epoch of the last notification, by any writer.
CREATE SEQUENCE IF NOT EXISTS eventgate_notify_clock MINVALUE 0 START 0;

CREATE OR REPLACE FUNCTION agent_job_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hint     record;
    mode     text := coalesce(current_setting('eventgate.notify', true), '');
    debounce interval;
    global   interval;
    now_ms   bigint;
BEGIN
    IF mode = 'off' THEN
        RETURN NULL;
    END IF;
    IF mode <> 'always' THEN
        BEGIN
            debounce := coalesce(nullif(current_setting('eventgate.notify_debounce', true), ''),
                                 '50 milliseconds')::interval;
            global := coalesce(nullif(current_setting('eventgate.notify_global_interval', true), ''),
                               '10 milliseconds')::interval;
        EXCEPTION WHEN others THEN
            debounce := interval '50 milliseconds';
            global := interval '10 milliseconds';
        END;
        now_ms := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
        IF global > interval '0' AND
           now_ms - (SELECT last_value FROM eventgate_notify_clock)
               < (extract(epoch FROM global) * 1000)::bigint THEN
            -- Someone notified a moment ago: the counter poll delivers this one.
            RETURN NULL;
        END IF;
    END IF;
    FOR hint IN SELECT job_id, max(seq) AS max_seq FROM new_rows GROUP BY job_id LOOP
        IF mode <> 'always' THEN
            -- The job row is already locked by this transaction (seq assignment), so
            -- this costs no wait; a HOT update of one small column.
            UPDATE agent_jobs SET notified_at = clock_timestamp()
             WHERE id = hint.job_id
               AND (notified_at IS NULL OR notified_at <= clock_timestamp() - debounce);
            CONTINUE WHEN NOT FOUND;
            PERFORM setval('eventgate_notify_clock', now_ms);
        END IF;
        PERFORM pg_notify('agent_job_events', hint.job_id::text || ':' || hint.max_seq::text);
    END LOOP;
    RETURN NULL;
END;
$$;
