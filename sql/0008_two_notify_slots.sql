-- Quiet writes notified at once more often: two slots for notifying transactions in
-- flight instead of one.
--
-- 0006's rule lets a statement on a quiet system notify at once only if it takes the
-- advisory transaction lock (1702260340, 6) without waiting, i.e. no other notifying
-- transaction is between its statement and the end of its commit; otherwise the
-- counter poll (20 ms) delivers it. That keeps notifying commits from forming a queue
-- at PostgreSQL's NOTIFY lock (held through the commit's WAL flush), which under load
-- slowed every writer. But on a quiet system two statements a fraction of a
-- millisecond apart are common (500 statements/s over 1,000 jobs: the fan-out bench's
-- `many_jobs`), and the second one's events then waited for the poll: p99
-- commit-to-receive about 20 ms where NOTIFY carries in 1.
-- Here a statement may also take a second lock, (1702260340, 7): at most two notifying
-- transactions are in flight, one committing and one waiting for it, so the wait at
-- the NOTIFY lock is at most one commit and still never a queue; a third goes to the
-- poll as before. Everything else of 0007's statement trigger is unchanged (it is
-- replaced whole, as PL/pgSQL functions are).

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
             -- every statement), if at most one other notifying transaction is in
             -- flight; busy ones share one notification per 10 ms.
             THEN (CASE WHEN coalesce(current_setting('eventgate.notify_quiet_rate', true), '') = ''
                        THEN eventgate_meter_passes(700, now_ms * 1000)
                        ELSE eventgate_meter_passes(
                                 eventgate_setting_num('eventgate.notify_quiet_rate', 700),
                                 now_ms * 1000)
                   END
                   -- Two slots: one notifying transaction committing and one waiting
                   -- behind it at the NOTIFY lock, never a queue (see the header).
                   AND (pg_try_advisory_xact_lock(1702260340, 6)
                        OR pg_try_advisory_xact_lock(1702260340, 7)))
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
