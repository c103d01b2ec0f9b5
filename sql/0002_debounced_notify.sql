-- Past the NOTIFY lock: notify at most once per interval per job.
--
-- PostgreSQL takes a cluster-wide lock at the commit of every transaction that issued
-- NOTIFY and holds it through the WAL flush, so a NOTIFY per write batch caps the whole
-- database at a few thousand batches per second. Here a job is notified only when its
-- last notification is older than `eventgate.notify_debounce` (default 1 s): an idle
-- job still wakes the gateway at once, a busy one notifies about once a second. The
-- gateway covers the rest with one query over the counters of the jobs it serves
-- (`agent_jobs.last_seq`) on a short timer, so no event waits longer than that timer.
--
-- Knobs, per session, role or database (`ALTER DATABASE ... SET ...`):
--   eventgate.notify = 'off'     no NOTIFY at all (bulk writers; the counter poll delivers)
--   eventgate.notify = 'always'  one NOTIFY per statement per job (the old behaviour)
--   eventgate.notify_debounce = '250ms'   the interval (any interval literal)

ALTER TABLE agent_jobs ADD COLUMN IF NOT EXISTS notified_at timestamptz;

CREATE OR REPLACE FUNCTION agent_job_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    hint     record;
    mode     text := coalesce(current_setting('eventgate.notify', true), '');
    debounce interval;
BEGIN
    IF mode = 'off' THEN
        RETURN NULL;
    END IF;
    BEGIN
        debounce := coalesce(nullif(current_setting('eventgate.notify_debounce', true), ''),
                             '1 second')::interval;
    EXCEPTION WHEN others THEN
        debounce := interval '1 second';
    END;
    FOR hint IN SELECT job_id, max(seq) AS max_seq FROM new_rows GROUP BY job_id LOOP
        IF mode <> 'always' THEN
            -- The job row is already locked by this transaction (seq assignment), so
            -- this costs no wait; a HOT update of one small column.
            UPDATE agent_jobs SET notified_at = clock_timestamp()
             WHERE id = hint.job_id
               AND (notified_at IS NULL OR notified_at <= clock_timestamp() - debounce);
            CONTINUE WHEN NOT FOUND;
        END IF;
        PERFORM pg_notify('agent_job_events', hint.job_id::text || ':' || hint.max_seq::text);
    END LOOP;
    RETURN NULL;
END;
$$;
