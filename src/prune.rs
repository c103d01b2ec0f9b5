//! `eventgate prune`: retention. Deletes the events of jobs that finished long ago, in
//! small batches, each its own short transaction, so no lock is held for long and the
//! gateway keeps serving meanwhile.

use std::time::Duration;

use crate::model::JobStatus;
use crate::Error;

/// Events deleted per statement.
pub const DEFAULT_BATCH: i64 = 5000;

/// Deletes events of jobs that reached a final status more than `older_than` ago.
/// Returns how many events were deleted.
pub async fn run(url: &str, older_than: Duration, batch: i64) -> Result<u64, Error> {
    let client = crate::db::connect(url).await?;
    let seconds = older_than.as_secs_f64();
    // The final statuses come from the model, so this list is not another copy.
    let sql = format!(
        "DELETE FROM agent_job_events WHERE id IN ( \
             SELECT e.id FROM agent_job_events e \
             JOIN agent_jobs j ON j.id = e.job_id \
             WHERE j.status IN ({}) \
               AND j.finished_at < now() - make_interval(secs => $1) \
             LIMIT $2 \
             FOR UPDATE OF e SKIP LOCKED)",
        JobStatus::terminal_sql_list()
    );
    let stmt = client.prepare(&sql).await?;
    let mut total = 0;
    loop {
        let deleted = client.execute(&stmt, &[&seconds, &batch]).await?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
        // Let other work in between batches.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
