//! The queries of the gateway: jobs and pages of their events.
//!
//! Timestamps are formatted by PostgreSQL (RFC 3339, UTC, microseconds) and jsonb is
//! passed through as text, so rows become JSON without a round trip through a value
//! tree.
//!
//! Every query reads both eventgate's own tables and the original system's, adopted by
//! `eventgate migrate` (see `db::Shape`): `status` and `level` may be enums, so they
//! are read as `::text` and compared as text; an event's `payload` may be NULL; a job
//! may lack eventgate's columns (`name`), so those are read from `to_jsonb(j)`, which
//! names no column and so cannot fail on either shape (and, unlike a view, puts no
//! dependency on the original columns that would stop its own migrations). Writes name
//! enum-typed columns through `jsonb_populate_record(set)`, which parses each value with
//! the column's own type.

use serde_json::value::RawValue;
use tokio_postgres::types::Json;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::{Event, Job, JobStatus, NewEvent};

/// `created_at` and friends as RFC 3339 text in UTC.
macro_rules! ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        )
    };
}

const JOB_COLUMNS: &str = concat!(
    "j.id, coalesce(to_jsonb(j)->>'name', to_jsonb(j)->>'type', ''), j.status::text, \
     j.payload::text, ",
    ts!("created_at"),
    ", ",
    ts!("updated_at"),
    ", ",
    ts!("started_at"),
    ", ",
    ts!("finished_at"),
    ", j.last_seq"
);

const EVENT_COLUMNS: &str = concat!(
    "id, job_id, seq, level::text, message, coalesce(payload, '{}')::text, ",
    ts!("created_at"),
    ", (extract(epoch FROM created_at) * 1000000)::int8, line"
);

fn job_from_row(row: &Row) -> Result<Job, tokio_postgres::Error> {
    Ok(Job {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        status: row.try_get(2)?,
        payload: raw(row.try_get(3)?),
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
        started_at: row.try_get(6)?,
        finished_at: row.try_get(7)?,
        last_seq: row.try_get(8)?,
    })
}

/// Builds an [`Event`] from a row selected with `EVENT_COLUMNS`. A value the model does
/// not know (a level outside [`crate::model::Level::ALL`]) is an error, not a panic.
pub fn event_from_row(row: &Row) -> Result<Event, tokio_postgres::Error> {
    Ok(Event {
        id: row.try_get(0)?,
        job_id: row.try_get(1)?,
        seq: row.try_get(2)?,
        level: row.try_get(3)?,
        message: row.try_get(4)?,
        payload: raw(row.try_get(5)?),
        created_at: row.try_get(6)?,
        created_us: row.try_get(7)?,
        line: row.try_get(8)?,
    })
}

/// jsonb printed by PostgreSQL is valid JSON.
fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text).expect("postgresql prints valid json")
}

/// Recent jobs, newest first.
pub async fn list_jobs(
    client: &impl tokio_postgres::GenericClient,
    limit: i64,
    status: Option<&str>,
) -> Result<Vec<Job>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM agent_jobs j WHERE ($1::text IS NULL OR status::text = $1) \
         ORDER BY created_at DESC, id LIMIT $2"
    );
    let rows = client.query(&sql, &[&status, &limit]).await?;
    rows.iter().map(job_from_row).collect()
}

/// Jobs by id (order unspecified).
pub async fn jobs_by_id(
    client: &impl tokio_postgres::GenericClient,
    ids: &[Uuid],
) -> Result<Vec<Job>, tokio_postgres::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM agent_jobs j WHERE id = ANY($1)");
    let rows = client.query(&sql, &[&ids]).await?;
    rows.iter().map(job_from_row).collect()
}

/// Jobs whose status changed most recently.
pub async fn recently_updated_jobs(
    client: &impl tokio_postgres::GenericClient,
    limit: i64,
) -> Result<Vec<Job>, tokio_postgres::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM agent_jobs j ORDER BY updated_at DESC LIMIT $1");
    let rows = client.query(&sql, &[&limit]).await?;
    rows.iter().map(job_from_row).collect()
}

/// One job.
pub async fn get_job(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
) -> Result<Option<Job>, tokio_postgres::Error> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM agent_jobs j WHERE id = $1");
    let row = client.query_opt(&sql, &[&id]).await?;
    row.as_ref().map(job_from_row).transpose()
}

/// A job's status and the highest seq handed out so far.
pub async fn job_cursor(
    client: &deadpool_postgres::Client,
    id: Uuid,
) -> Result<Option<(JobStatus, i64)>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT status::text, last_seq FROM agent_jobs WHERE id = $1")
        .await?;
    let row = client.query_opt(&stmt, &[&id]).await?;
    row.map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).transpose()
}

/// Creates a job; `id` defaults to a random one. On the original system's table the
/// name is its `type` (at most 64 characters) and its other required columns get that
/// system's defaults; keys that are not columns of the table are ignored.
pub async fn create_job(
    client: &impl tokio_postgres::GenericClient,
    id: Option<Uuid>,
    name: &str,
    status: &str,
    payload: &serde_json::Value,
) -> Result<Job, tokio_postgres::Error> {
    create_job_with(client, id, name, status, payload, &serde_json::json!({})).await
}

/// [`create_job`] with `columns`, a JSON object by column name (the original's `type`,
/// `priority`, `max_attempts`, `affinity_key`, ...), that overrides the defaults where
/// the table has the column; other keys are ignored.
pub async fn create_job_with(
    client: &impl tokio_postgres::GenericClient,
    id: Option<Uuid>,
    name: &str,
    status: &str,
    payload: &serde_json::Value,
    columns: &serde_json::Value,
) -> Result<Job, tokio_postgres::Error> {
    let id = id.unwrap_or_else(Uuid::new_v4);
    let sql = format!(
        "INSERT INTO agent_jobs AS j \
         SELECT * FROM jsonb_populate_record(NULL::agent_jobs, jsonb_build_object( \
             'id', $1::uuid, 'name', $2::text, 'type', left($2::text, 64), \
             'status', $3::text, 'payload', $4::jsonb, \
             'priority', 0, 'attempt', 1, 'max_attempts', 3, \
             'created_at', now(), 'updated_at', now(), 'last_seq', 0, 'last_line', 0, \
             'started_at', CASE WHEN $3::text = 'running' THEN now() END) || $5::jsonb) \
         RETURNING {JOB_COLUMNS}"
    );
    let row = client
        .query_one(&sql, &[&id, &name, &status, payload, columns])
        .await?;
    job_from_row(&row)
}

/// The columns of jobs beyond [`Job`]'s (on the original system's table: `type`,
/// `priority`, `attempt`, `max_attempts`, `affinity_key`, `claimed_by`, ...), by job,
/// keyed by column name; empty objects on eventgate's own table.
pub async fn job_columns(
    client: &impl tokio_postgres::GenericClient,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, serde_json::Value)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, to_jsonb(j) - ARRAY['id', 'name', 'status', 'payload', 'created_at', \
                 'updated_at', 'started_at', 'finished_at', 'last_seq', 'last_line', \
                 'notified_at'] \
             FROM agent_jobs j WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Sets a job's status; the triggers record the change as a status event in the same
/// transaction. The value is parsed with the column's own type, so this works on the
/// original system's enum `agentjobstatus` as on text. Returns whether the job exists.
pub async fn set_job_status(
    client: &impl tokio_postgres::GenericClient,
    id: Uuid,
    status: &str,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "UPDATE agent_jobs SET status = (jsonb_populate_record(NULL::agent_jobs, \
                 jsonb_build_object('status', $2::text))).status \
             WHERE id = $1",
            &[&id, &status],
        )
        .await?;
    Ok(n == 1)
}

/// Appends events in ONE statement (so one notification), in the given order.
/// Returns `(id, seq)` of each, in that order.
pub async fn append_events(
    client: &impl tokio_postgres::GenericClient,
    job_id: Uuid,
    events: &[NewEvent],
) -> Result<Vec<(Uuid, i64)>, tokio_postgres::Error> {
    #[derive(Debug, serde::Serialize)]
    struct Row<'a> {
        level: &'a str,
        message: &'a str,
        payload: &'a serde_json::Value,
    }
    let rows: Vec<Row> = events
        .iter()
        .map(|e| Row {
            level: e.level.as_str(),
            message: &e.message,
            payload: &e.payload,
        })
        .collect();
    // jsonb_populate_recordset gives `level` the column's type (text or enum).
    let rows = client
        .query(
            "INSERT INTO agent_job_events (job_id, level, message, payload) \
             SELECT $1, r.level, r.message, coalesce(r.payload, '{}') \
             FROM jsonb_populate_recordset(NULL::agent_job_events, $2::jsonb) \
                 WITH ORDINALITY AS r ORDER BY r.ordinality \
             RETURNING id, seq",
            &[&job_id, &Json(&rows)],
        )
        .await?;
    let mut out: Vec<(Uuid, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    out.sort_by_key(|&(_, seq)| seq);
    Ok(out)
}

/// Most bytes of messages and payloads (as text) in one page of events, past its first
/// event (a page always holds one, whatever its size): the backfill of a stream, the
/// hub's live reads and polling pages alike, so that no page of a job of large events
/// pins much memory. Encoded, a page can be larger (a control character escapes to six
/// bytes of JSON), so the encoders stop at [`PAGE_BYTES`] of output too.
pub const PAGE_BYTES: i64 = 1 << 20;

/// The size a page's byte budget counts for one event: its message and its payload as
/// text. `PAGE_SIZE_SQL` is the same measure in SQL, over `agent_job_events` columns.
pub fn page_size(event: &Event) -> i64 {
    (event.message.len() + event.payload.get().len()) as i64
}

const PAGE_SIZE_SQL: &str = "(octet_length(message) + octet_length(coalesce(payload, '{}')::text))";

/// Whether a page read with `limit` rows and [`PAGE_BYTES`] may have stopped short of
/// what the table holds: it is full in rows or in bytes.
pub fn page_is_full(events: &[Event], limit: i64) -> bool {
    events.len() as i64 >= limit || events.iter().map(page_size).sum::<i64>() >= PAGE_BYTES
}

/// `rows` (a subquery of whole `agent_job_events` rows in page order) cut where the
/// bytes of the rows before a row reach `$budget`, in the same order.
fn within_bytes(rows: &str, order: &str, budget: &str) -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM ( \
             SELECT p.*, sum({PAGE_SIZE_SQL}) OVER (ORDER BY seq {order}) - {PAGE_SIZE_SQL} \
                 AS eventgate_before \
             FROM ({rows}) p \
         ) w WHERE eventgate_before < {budget} ORDER BY seq {order}"
    )
}

/// Events with `after < seq < before`, ascending: the first `limit` of them, and no
/// more than [`PAGE_BYTES`] past the first (see [`page_is_full`]).
pub async fn events_after(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    after: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    events_between(client, job_id, after, before, limit, "").await
}

/// `after < seq < before` in `order` (`""` or `"DESC"`), `limit` and [`PAGE_BYTES`]
/// counted from the first in that order.
async fn events_between(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    after: i64,
    before: Option<i64>,
    limit: i64,
    order: &str,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let sql = within_bytes(
        &format!(
            "SELECT * FROM agent_job_events \
             WHERE job_id = $1 AND seq > $2 AND ($3::int8 IS NULL OR seq < $3) \
             ORDER BY seq {order} LIMIT $4"
        ),
        order,
        "$5",
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&job_id, &after, &before, &limit, &PAGE_BYTES])
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// The id of the job's event at `seq`, if the table has one.
pub async fn event_id_at(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    seq: i64,
) -> Result<Option<Uuid>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached("SELECT id FROM agent_job_events WHERE job_id = $1 AND seq = $2")
        .await?;
    let row = client.query_opt(&stmt, &[&job_id, &seq]).await?;
    row.map(|r| r.try_get(0)).transpose()
}

/// For each job `ids[i]`, its first `limit` events with `seq > afters[i]` (and no more
/// than [`PAGE_BYTES`] past the first), in ONE query (an index probe per job), ordered
/// by job and seq. Each event comes with the id of the event just before it in the
/// table (`None` for the first of a job when `afters[i]` is 0, or when the table has no
/// event at `afters[i]`): what [`crate::hub`] compares with the id it broadcast at
/// that seq, so that new events are never appended to a history that went back (a
/// failover) without noticing. The index scan starts at `afters[i]` itself, so the
/// check costs one more tuple of a page the scan reads anyway, and that row is not
/// returned.
pub async fn events_following_each(
    client: &deadpool_postgres::Client,
    ids: &[Uuid],
    afters: &[i64],
    limit: i64,
) -> Result<Vec<(Event, Option<Uuid>)>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, eventgate_prev \
         FROM unnest($1::uuid[], $2::int8[]) AS c(want_job, after_seq) \
         CROSS JOIN LATERAL ( \
             SELECT * FROM ( \
                 SELECT q.*, sum({PAGE_SIZE_SQL}) OVER (ORDER BY seq) - {PAGE_SIZE_SQL} \
                     AS eventgate_before \
                 FROM ( \
                     SELECT p.*, lag(p.id) OVER (ORDER BY p.seq) AS eventgate_prev \
                     FROM ( \
                         SELECT * FROM agent_job_events \
                         WHERE job_id = c.want_job AND seq >= c.after_seq \
                         ORDER BY seq LIMIT $3::int8 + (c.after_seq > 0)::int \
                     ) p \
                 ) q WHERE q.seq > c.after_seq \
             ) w WHERE eventgate_before < $4 \
         ) e \
         ORDER BY job_id, seq"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&ids, &afters, &limit, &PAGE_BYTES])
        .await?;
    rows.iter()
        .map(|row| Ok((event_from_row(row)?, row.try_get(9)?)))
        .collect()
}

/// The last `limit` events with `seq < before` (and no more than [`PAGE_BYTES`] counted
/// from the newest), ascending (the newest page of a log, then older pages as a viewer
/// scrolls up).
pub async fn events_before(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    before: i64,
    limit: i64,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let sql = within_bytes(
        "SELECT * FROM agent_job_events WHERE job_id = $1 AND seq < $2 \
         ORDER BY seq DESC LIMIT $3",
        "DESC",
        "$4",
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&job_id, &before, &limit, &PAGE_BYTES])
        .await?;
    let mut events: Vec<Event> = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
    events.reverse();
    Ok(events)
}

/// The last `limit` events with `after < seq < before` (and no more than [`PAGE_BYTES`]
/// counted from the newest), newest first (`sort=desc`).
pub async fn events_desc(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    after: i64,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    events_between(client, job_id, after, before, limit, "DESC").await
}

/// The events of one level with `after < seq < before`: the first `limit`, ascending,
/// or with `newest` the last `limit`, newest first. No index on `level` is kept for it:
/// the query walks the job's `(job_id, seq)` index and stops at the `limit`-th match,
/// so finding a job's first error reads the rows before it, at most the job's log.
pub async fn events_at_level(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    level: &str,
    after: i64,
    before: Option<i64>,
    limit: i64,
    newest: bool,
) -> Result<Vec<Event>, tokio_postgres::Error> {
    let order = if newest { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM agent_job_events \
         WHERE job_id = $1 AND seq > $2 AND ($3::int8 IS NULL OR seq < $3) \
             AND level::text = $4 \
         ORDER BY seq {order} LIMIT $5"
    );
    let stmt = client.prepare_cached(&sql).await?;
    let rows = client
        .query(&stmt, &[&job_id, &after, &before, &level, &limit])
        .await?;
    rows.iter().map(event_from_row).collect()
}

/// The first seq of events created at or after a time (the original `before` cursor
/// without an event id); `None` when there is none.
pub async fn seq_from_time(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    before: &str,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT min(seq) FROM agent_job_events \
             WHERE job_id = $1 AND created_at >= $2::text::timestamptz",
            &[&job_id, &before],
        )
        .await?;
    Ok(row.get(0))
}

/// The seq of an event given by id (the original API's `afterEventId` cursor).
pub async fn seq_of_event(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    event_id: Uuid,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT seq FROM agent_job_events WHERE job_id = $1 AND id = $2",
            &[&job_id, &event_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The last seq of events created at or before a time (the original `after` cursor
/// without an event id).
pub async fn seq_at_time(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    after: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT coalesce(max(seq), 0) FROM agent_job_events \
             WHERE job_id = $1 AND created_at <= $2::text::timestamptz",
            &[&job_id, &after],
        )
        .await?;
    Ok(row.get(0))
}

/// `(seq, message)` of the events after `after`, ascending: at most `limit` rows and,
/// past the first row, at most `max_bytes` bytes of messages (the raw log's pages).
pub async fn log_page(
    client: &deadpool_postgres::Client,
    job_id: Uuid,
    after: i64,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<(i64, String)>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT seq, message FROM ( \
                 SELECT seq, message, \
                     sum(octet_length(message)) OVER (ORDER BY seq) - octet_length(message) AS before \
                 FROM (SELECT seq, message FROM agent_job_events \
                       WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3) p \
             ) w WHERE before < $4 ORDER BY seq",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&job_id, &after, &limit, &max_bytes])
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The seq of the event holding line `line` of a job's log: the last event whose first
/// line is at most `line` (None before the first). A binary search over seqs, each
/// step one probe of the (job_id, seq) index, so no index on `line` is kept for it:
/// lines grow with seqs.
pub async fn seq_of_line(
    client: &impl tokio_postgres::GenericClient,
    job_id: Uuid,
    line: i64,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let Some(last) = client
        .query_opt("SELECT last_seq FROM agent_jobs WHERE id = $1", &[&job_id])
        .await?
    else {
        return Ok(None);
    };
    let probe = client
        .prepare(
            "SELECT seq, line FROM agent_job_events \
             WHERE job_id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT 1",
        )
        .await?;
    // The answer is in lo..=hi, where lo = 0 means "none".
    let (mut lo, mut hi): (i64, i64) = (0, last.get(0));
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match client.query_opt(&probe, &[&job_id, &mid, &hi]).await? {
            Some(row) if row.get::<_, i64>(1) <= line => lo = row.get(0),
            _ => hi = mid - 1,
        }
    }
    Ok((lo > 0).then_some(lo))
}
