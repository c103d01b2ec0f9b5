//! The HTTP layer's one error type: a client mistake or an outage, as the JSON
//! `{"error": code, "message": text}` with the right status.

use std::error::Error as StdError;
use std::fmt;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::body::{json_response, Body};
use crate::auth::Failure;

/// The cause of an error, kept for logs and `source()`.
type Cause = Box<dyn StdError + Send + Sync>;

/// An HTTP error: status, stable code, short message, and what caused it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    cause: Option<Cause>,
}

/// What handlers return.
pub(crate) type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub(crate) fn job_not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "job not found")
    }

    pub(crate) fn not_found(message: &'static str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The database could not answer: 503, the cause logged and kept.
    pub(crate) fn unavailable(cause: impl Into<Cause>) -> ApiError {
        let cause = cause.into();
        tracing::warn!(error = %cause, "database unavailable");
        ApiError {
            cause: Some(cause),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unavailable",
                "the database is unavailable, retry later",
            )
        }
    }

    pub(crate) fn auth(failure: Failure) -> ApiError {
        let (status, code) = if failure.is_forbidden() {
            (StatusCode::FORBIDDEN, "forbidden")
        } else {
            (StatusCode::UNAUTHORIZED, "unauthorized")
        };
        ApiError::new(status, code, failure.message())
    }

    /// The response; a 503 carries `Retry-After` (`retry_after` seconds, at least 1).
    pub(crate) fn response(&self, retry_after: Option<u64>) -> Response<Body> {
        let mut res = json_response(
            self.status,
            &json!({ "error": self.code, "message": self.message }),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = match self.message.as_str() {
                m if m == Failure::Missing.message() => "Bearer realm=\"eventgate\"",
                _ => "Bearer realm=\"eventgate\", error=\"invalid_token\"",
            };
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still come: the connection cannot carry another
            // request, so it closes after this answer (RFC 9110, 15.5.9).
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            let secs = retry_after.unwrap_or(1).max(1);
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl StdError for ApiError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> ApiError {
        ApiError::unavailable(e)
    }
}

impl From<deadpool_postgres::PoolError> for ApiError {
    fn from(e: deadpool_postgres::PoolError) -> ApiError {
        ApiError::unavailable(crate::Error::from(e))
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> ApiError {
        ApiError::unavailable(crate::Error::from(e))
    }
}
