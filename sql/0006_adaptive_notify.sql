-- Notification that adapts: at once when writes are few, coalesced only when many.
--
-- 0002/0003 let a statement notify only when no statement of ANY job notified in the
-- last 10 ms. That caps NOTIFY at ~100 a second, which the lock bears easily, but it
-- also holds back events on a system that is nowhere near the cap: 1,000 jobs writing
-- 0.5 statements a second each (500 a second) had four in five statements wait for the
-- gateway's 20 ms counter poll (p99 24.5 ms commit-to-receive), though NOTIFY at that
-- rate would have cost nothing.
--
-- Here every statement that may notify first passes a meter of the write rate: a
-- token bucket kept as one "theoretical arrival time" (GCRA) in the sequence
-- `eventgate_write_meter`, in microseconds. Each statement moves it on by 1/rate
-- (from now, if it lay in the past); while it stays within a 50 ms burst of now, the
-- statement rate is below `eventgate.notify_quiet_rate` (default 700 a second, about
-- three quarters of the NOTIFY commits this machine's lock bears: `always` in
-- benches/notify.rs peaks near 900 a second) and the statement notifies at once,
-- subject only to its job's debounce (`eventgate.notify_debounce`, 50 ms: a lone
-- event, or the first of a job's burst, is never held back). Once the rate passes the
-- threshold, the rule of 0002/0003 takes over (at most one NOTIFY per 10 ms over all
-- jobs), and the counter poll delivers the rest, until the meter drains again.
--
-- The rate alone is not enough: where the lock bears fewer NOTIFYs than the threshold
-- (fsync on a busy disk: one notifying commit at a time, each through its own WAL
-- flush), notifying every statement slows the writers down to below the threshold, and
-- the meter then never sees them as busy (measured: 16 writers at 236 batches/s, every
-- one notified, against 994 without NOTIFY). So a statement notifies at once only if,
-- besides, it can take the advisory lock (1702260340, 6) without waiting: a
-- transaction lock, so it is held by one notifying transaction from its statement until
-- its commit has ended, which is when PostgreSQL's NOTIFY lock is released too. When
-- another one is in flight, this commit would queue behind it for the NOTIFY lock:
-- instead it takes 0003's rule and leaves the event to the counter poll. So the fast
-- path never makes a queue at the NOTIFY lock: on a quiet system (or with fast commits)
-- the try always succeeds and every statement notifies at once; under load it mostly
-- fails and the system behaves as with 0003.
--
-- A sequence is not transactional, so writers never wait on each other for the meter;
-- two that read it at once may both pass, which only makes the rate approximate. The
-- meter never runs more than two bursts ahead of now, so a busy spell is forgotten
-- 50 ms after it ends.
--
-- Invariant 6 holds: the function that sends is 0003's, one hint per job per statement
-- at most, `job_id:max_seq`. Nothing is lost: a statement that does not notify is found
-- by the gateway's counter poll, as before.
--
-- Knobs (per session, role or database), besides those of 0002:
--   eventgate.notify_quiet_rate = '700'    statements a second below which each
--                                          notifies at once ('0': never, 0003's rule)
--   eventgate.notify_global_interval set   explicitly: 0003's fixed rule alone, as
--                                          before this file (no meter)

CREATE SEQUENCE IF NOT EXISTS eventgate_write_meter MINVALUE 0 START 0;

-- A number setting; `fallback` when unset, empty or not a number.
CREATE OR REPLACE FUNCTION eventgate_setting_num(name text, fallback float8) RETURNS float8
LANGUAGE plpgsql STABLE AS $$
DECLARE
    raw text := current_setting(name, true);
BEGIN
    IF raw IS NULL OR raw = '' THEN
        RETURN fallback;
    END IF;
    RETURN raw::float8;
EXCEPTION WHEN others THEN
    RETURN fallback;
END;
$$;

-- True when the statements metered so far (this one included) came at less than
-- `rate` a second, bursts of 50 ms allowed; moves the meter on either way.
CREATE OR REPLACE FUNCTION eventgate_writes_quiet(rate float8) RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT CASE WHEN rate <= 0 THEN false
                ELSE setval('eventgate_write_meter',
                            least(greatest(coalesce(pg_sequence_last_value('eventgate_write_meter'), 0),
                                           t.now_us) + 1e6 / rate,
                                  t.now_us + 100000)::bigint)
                     <= t.now_us + 50000
           END
      FROM (SELECT date_part('epoch', clock_timestamp()) * 1e6 AS now_us) t
$$;

DROP TRIGGER IF EXISTS agent_job_events_notify ON agent_job_events;
CREATE TRIGGER agent_job_events_notify
    AFTER INSERT ON agent_job_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (CASE coalesce(current_setting('eventgate.notify', true), '')
              WHEN 'off' THEN false
              WHEN 'always' THEN true
              ELSE CASE WHEN coalesce(current_setting('eventgate.notify_global_interval', true), '') = ''
                        -- The default: quiet writes notify at once; busy ones share
                        -- one notification per 10 ms.
                        THEN (eventgate_writes_quiet(
                                  CASE WHEN coalesce(current_setting('eventgate.notify_quiet_rate', true), '') = ''
                                       THEN 700
                                       ELSE eventgate_setting_num('eventgate.notify_quiet_rate', 700)
                                  END)
                              -- ... and no other notifying transaction in flight.
                              AND pg_try_advisory_xact_lock(1702260340, 6))
                             OR date_part('epoch', clock_timestamp()) * 1000
                                    - coalesce(pg_sequence_last_value('eventgate_notify_clock'), 0) >= 10
                        -- An explicit global interval: 0003's rule, unchanged.
                        ELSE date_part('epoch', clock_timestamp()) * 1000
                                 - coalesce(pg_sequence_last_value('eventgate_notify_clock'), 0)
                             >= eventgate_setting_ms('eventgate.notify_global_interval', 10)
                   END
          END)
    EXECUTE FUNCTION agent_job_events_notify();
