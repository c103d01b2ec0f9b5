//! `eventgate run`: runs a command and streams its output as batched, redacted events.

/// Flags of `eventgate run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The job to write to.
    #[arg(long)]
    pub job: uuid::Uuid,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs the worker; returns the process exit code.
pub async fn run_cli(_database_url: &str, _args: RunArgs) -> i32 {
    eprintln!("eventgate run: not built yet");
    2
}
