//! The domain: jobs, their statuses, their events and how a job ends.
//!
//! Everything else speaks these types: [`crate::store`] reads rows into them,
//! [`crate::sse`] encodes them, the HTTP layer validates requests against them. The
//! status and level lists live here once; the SQL `CHECK` constraints of
//! `sql/0001_jobs_and_events.sql` repeat them for the database, and a test keeps the two equal.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio_postgres::types::{FromSql, Kind, Type};
use uuid::Uuid;

/// Where a job is in its life. `queued` and `running` may still change; the others are
/// final ([`JobStatus::is_terminal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    DeadLetter,
}

impl JobStatus {
    /// Every status, in the order of the SQL `CHECK`.
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::DeadLetter,
    ];

    /// The status as stored and as JSON shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::DeadLetter => "dead_letter",
        }
    }

    /// Whether nothing more is expected of a job in this status: its stream ends once
    /// the status event that set it was sent.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// The final statuses as an SQL list, `'succeeded', 'failed', ...`, for queries
    /// that filter on them.
    pub fn terminal_sql_list() -> String {
        JobStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A status name that is not one of [`JobStatus::ALL`] (or a level not one of
/// [`Level::ALL`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown(String);

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown value {:?}", self.0)
    }
}

impl std::error::Error for Unknown {}

impl FromStr for JobStatus {
    type Err = Unknown;

    fn from_str(text: &str) -> Result<JobStatus, Unknown> {
        JobStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| Unknown(text.to_string()))
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    /// Every level, in the order of the SQL `CHECK`.
    pub const ALL: [Level; 3] = [Level::Info, Level::Warn, Level::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

impl FromStr for Level {
    type Err = Unknown;

    fn from_str(text: &str) -> Result<Level, Unknown> {
        Level::ALL
            .into_iter()
            .find(|l| l.as_str() == text)
            .ok_or_else(|| Unknown(text.to_string()))
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Both enums are read from `text` columns or from PostgreSQL enum types (whose binary
/// form is the label); a value outside the list is a row error, never a panic.
macro_rules! from_sql_by_name {
    ($ty:ty) => {
        impl<'a> FromSql<'a> for $ty {
            fn from_sql(
                ty: &Type,
                raw: &'a [u8],
            ) -> Result<$ty, Box<dyn std::error::Error + Sync + Send>> {
                let text = <&str as FromSql>::from_sql(ty, raw)?;
                Ok(text.parse()?)
            }

            fn accepts(ty: &Type) -> bool {
                <&str as FromSql>::accepts(ty) || matches!(ty.kind(), Kind::Enum(_))
            }
        }
    };
}

from_sql_by_name!(JobStatus);
from_sql_by_name!(Level);

/// One row of `agent_jobs`, as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: Uuid,
    pub name: String,
    pub status: JobStatus,
    pub payload: Box<RawValue>,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub last_seq: i64,
}

/// One row of `agent_job_events`, as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: Uuid,
    pub job_id: Uuid,
    pub seq: i64,
    /// The number of the first line of `message` over the job's whole log (a message
    /// counts as its `\n`-separated parts).
    pub line: i64,
    pub level: Level,
    pub message: String,
    /// The jsonb payload as PostgreSQL printed it, passed through without re-parsing.
    pub payload: Box<RawValue>,
    /// RFC 3339 in UTC with microseconds, formatted by the query.
    pub created_at: String,
    /// `created_at` in microseconds since the epoch (for the latency histogram).
    #[serde(skip)]
    pub created_us: i64,
}

impl Event {
    /// The status carried by a `kind = "status"` event, if this is one (and names a
    /// known status).
    pub fn status(&self) -> Option<JobStatus> {
        #[derive(serde::Deserialize)]
        struct StatusPayload<'a> {
            kind: Option<&'a str>,
            status: Option<&'a str>,
        }
        let payload: StatusPayload = serde_json::from_str(self.payload.get()).ok()?;
        match payload.kind {
            Some("status") => payload.status?.parse().ok(),
            _ => None,
        }
    }
}

/// An event to append: what a writer gives, before the database numbers it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub level: Level,
    pub message: String,
    pub payload: serde_json::Value,
}

/// The end of a finished job's stream: everything up to `last_seq` was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub status: JobStatus,
    pub last_seq: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quoted names of the `CHECK (<column> IN (...))` of `sql/0001_jobs_and_events.sql`.
    fn sql_check_list(column: &str) -> Vec<String> {
        let sql = include_str!("../sql/0001_jobs_and_events.sql");
        let start = format!("CHECK ({column} IN (");
        let at = sql.find(&start).expect("the CHECK is in sql/0001") + start.len();
        let list = &sql[at..at + sql[at..].find(')').expect("the list ends")];
        list.split(',')
            .map(|s| s.trim().trim_matches('\'').to_string())
            .collect()
    }

    #[test]
    fn status_list_matches_the_sql_check() {
        let model: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(sql_check_list("status"), model);
    }

    #[test]
    fn level_list_matches_the_sql_check() {
        let model: Vec<&str> = Level::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(sql_check_list("level"), model);
    }

    #[test]
    fn names_round_trip_and_json_matches() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>(), Ok(status));
            assert_eq!(
                serde_json::to_string(&status).unwrap(),
                format!("\"{status}\"")
            );
        }
        for level in Level::ALL {
            assert_eq!(level.as_str().parse::<Level>(), Ok(level));
            assert_eq!(
                serde_json::to_string(&level).unwrap(),
                format!("\"{level}\"")
            );
        }
        assert!("done".parse::<JobStatus>().is_err());
        assert!("Info".parse::<Level>().is_err());
    }

    #[test]
    fn terminal_rule() {
        let terminal: Vec<_> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                JobStatus::Succeeded,
                JobStatus::Failed,
                JobStatus::Cancelled,
                JobStatus::DeadLetter
            ]
        );
        assert_eq!(
            JobStatus::terminal_sql_list(),
            "'succeeded', 'failed', 'cancelled', 'dead_letter'"
        );
    }
}
