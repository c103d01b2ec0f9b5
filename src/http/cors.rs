//! CORS: which browser origins may call the API, and their preflights.

use hyper::header::{self, HeaderValue};
use hyper::{HeaderMap, Request, Response, StatusCode};

use super::body::{empty, Body};
use super::error::ApiError;
use crate::config::Config;

/// The request's `Origin` when it is on the allow-list (exact match).
pub(super) fn allowed_origin<B>(config: &Config, req: &Request<B>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    config
        .cors_origins
        .iter()
        .any(|o| o == text)
        .then(|| origin.clone())
}

/// Answers a CORS preflight: allowed origins get the methods and headers we take;
/// others get 403 and no CORS headers, so the browser blocks the call.
pub(super) fn preflight(origin: Option<HeaderValue>) -> Response<Body> {
    let Some(origin) = origin else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not call the api",
        )
        .response(None);
    };
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)
        .header(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true")
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS")
        .header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type, Last-Event-ID",
        )
        .header(header::ACCESS_CONTROL_MAX_AGE, "600")
        .header(header::VARY, "Origin")
        .body(empty())
        .expect("constant headers won't error")
}

/// Marks a response as readable by an allowed origin.
pub(super) fn allow(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}
