//! `/api/queue/jobs` and `/api/queue/jobs/{id}`: the job list, one job, a new job.

use std::collections::HashMap;

use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::body::{json_response, read_json, Body, RequestBody};
use super::error::{ApiError, Result};
use super::query::JobsQuery;
use super::App;
use crate::auth::{Failure, Grant};
use crate::model::{Job, JobStatus};
use crate::store;

pub(super) async fn list<B>(app: &App, req: &Request<B>, grant: &Grant) -> Result<Response<Body>> {
    let query = JobsQuery::parse(req)?;
    let client = app.pool.get().await?;
    let mut items =
        store::list_jobs(&**client, query.limit, query.status.map(JobStatus::as_str)).await?;
    if !grant.covers_all() {
        // A token for some jobs lists only those.
        items.retain(|job| grant.covers(job.id));
    }
    let items = with_columns(&**client, &items).await?;
    Ok(json_response(StatusCode::OK, &json!({ "items": items })))
}

/// Jobs as JSON with the table's other columns (the original's `type`, `priority`,
/// `attempt`, `maxAttempts`, ...) added in camelCase; the fields of [`Job`] unchanged.
async fn with_columns(
    client: &impl tokio_postgres::GenericClient,
    jobs: &[Job],
) -> Result<Vec<serde_json::Value>> {
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.id).collect();
    let columns: HashMap<Uuid, serde_json::Value> = store::job_columns(client, &ids)
        .await?
        .into_iter()
        .collect();
    let mut out = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut value = serde_json::to_value(job).expect("a job always serializes");
        if let (Some(fields), Some(serde_json::Value::Object(extra))) =
            (value.as_object_mut(), columns.get(&job.id))
        {
            for (name, v) in extra {
                fields.entry(camel_case(name)).or_insert_with(|| v.clone());
            }
        }
        out.push(value);
    }
    Ok(out)
}

fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

pub(super) async fn get(app: &App, id: Uuid) -> Result<Response<Body>> {
    let client = app.pool.get().await?;
    match store::get_job(&**client, id).await? {
        Some(job) => {
            let job = with_columns(&**client, &[job]).await?;
            Ok(json_response(StatusCode::OK, &job[0]))
        }
        None => Err(ApiError::job_not_found()),
    }
}

/// A new job, in this gateway's shape `{id?, name, status?, payload?}` or the original
/// system's `{type, priority=0, payload={}, affinityKey?, maxAttempts>=1 (3)}`;
/// camelCase or snake_case; unknown fields ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateJob {
    id: Option<Uuid>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    status: Option<String>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default, alias = "affinity_key")]
    affinity_key: Option<String>,
    #[serde(default, alias = "max_attempts")]
    max_attempts: Option<i32>,
}

pub(super) async fn create<B: RequestBody>(
    app: &App,
    req: Request<B>,
    grant: &Grant,
) -> Result<Response<Body>> {
    let body: CreateJob = read_json(req, app.config.max_body, app.config.body_timeout).await?;
    // A token for some jobs may create only those, by id.
    if !grant.covers_all() && !body.id.is_some_and(|id| grant.covers(id)) {
        app.metrics.auth_failure(Failure::Job);
        return Err(ApiError::auth(Failure::Job));
    }
    let status = match body.status.as_deref() {
        None => JobStatus::Queued,
        Some(text) => text
            .parse::<JobStatus>()
            .map_err(|_| ApiError::bad_request("invalid_status", "unknown job status"))?,
    };
    let payload = match body.payload {
        None | Some(serde_json::Value::Null) => json!({}),
        Some(payload) => payload,
    };
    if !payload.is_object() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "payload must be an object",
        ));
    }
    if body.max_attempts.is_some_and(|n| n < 1) {
        return Err(ApiError::bad_request(
            "invalid_body",
            "maxAttempts must be at least 1",
        ));
    }
    // The original's columns; on a table without them they are ignored.
    let mut columns = serde_json::Map::new();
    if let Some(kind) = &body.kind {
        columns.insert("type".into(), json!(kind));
    }
    if let Some(priority) = body.priority {
        columns.insert("priority".into(), json!(priority));
    }
    if let Some(key) = &body.affinity_key {
        columns.insert("affinity_key".into(), json!(key));
    }
    if let Some(n) = body.max_attempts {
        columns.insert("max_attempts".into(), json!(n));
    }
    // PostgreSQL text and jsonb cannot hold NUL: replaced, as in appended events.
    let name = body
        .name
        .or(body.kind)
        .unwrap_or_default()
        .replace('\0', "\u{FFFD}");
    let columns = super::events::strip_nul(serde_json::Value::Object(columns));
    let payload = super::events::strip_nul(payload);
    let client = app.pool.get().await?;
    let created = store::create_job_with(
        &**client,
        body.id,
        &name,
        status.as_str(),
        &payload,
        &columns,
    )
    .await;
    match created {
        Ok(job) => {
            let job = with_columns(&**client, &[job]).await?;
            Ok(json_response(StatusCode::CREATED, &job[0]))
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_exists",
                "a job with this id exists",
            ))
        }
        Err(e) => Err(e.into()),
    }
}
