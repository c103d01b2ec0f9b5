//! The crate's one error type for everything that is not an HTTP response.

use std::fmt;

/// An error of eventgate: a short lowercase message and what kind of failure it is.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
    /// What caused it, for `source()`; its text is already part of `message`.
    cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Config,
    Db,
    Io,
    /// A bug or a task that failed (a panic): a run-time failure, never a usage one.
    Internal,
}

impl Error {
    /// A configuration mistake (bad flag, bad URL).
    pub fn config(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Config,
            message: message.into(),
            cause: None,
        }
    }

    /// A database error that is not a connection loss.
    pub fn db(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Db,
            message: message.into(),
            cause: None,
        }
    }

    /// A task that failed or panicked: a run-time failure (exit 1), not a usage one.
    pub fn internal(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Internal,
            message: message.into(),
            cause: None,
        }
    }

    /// Whether this is a configuration mistake.
    pub fn is_config(&self) -> bool {
        self.kind == Kind::Config
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        // tokio-postgres' Display of a DbError shows only the severity; use its message.
        let message = match e.as_db_error() {
            Some(db) => format!("database: {}", db.message()),
            None => format!("database: {e}"),
        };
        Error {
            kind: Kind::Db,
            message,
            cause: Some(Box::new(e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Error {
        Error {
            kind: Kind::Db,
            message: format!("database pool: {e}"),
            cause: Some(Box::new(e)),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error {
            kind: Kind::Io,
            message: e.to_string(),
            cause: Some(Box::new(e)),
        }
    }
}
