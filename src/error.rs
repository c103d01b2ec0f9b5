//! The crate's one error type for everything that is not an HTTP response.

use std::fmt;

/// An error of eventgate: a short lowercase message and what kind of failure it is.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Config,
    Db,
    Io,
}

impl Error {
    /// A configuration mistake (bad flag, bad URL).
    pub fn config(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Config,
            message: message.into(),
        }
    }

    /// A database error that is not a connection loss.
    pub fn db(message: impl Into<String>) -> Error {
        Error {
            kind: Kind::Db,
            message: message.into(),
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

impl std::error::Error for Error {}

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
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Error {
        Error {
            kind: Kind::Db,
            message: format!("database pool: {e}"),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error {
            kind: Kind::Io,
            message: e.to_string(),
        }
    }
}
