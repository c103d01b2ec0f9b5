//! The dashboard of `web/`, compiled into the binary so `eventgate` is one file.

use hyper::header;
use hyper::Response;

use super::body::{full, Body};
use super::error::ApiError;

/// `(path under web/, content type, contents)`.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../web/index.html"),
    ),
    (
        "job.html",
        "text/html; charset=utf-8",
        include_str!("../../web/job.html"),
    ),
    (
        "static/app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/static/app.css"),
    ),
    (
        "static/list.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/static/list.js"),
    ),
    (
        "static/job.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/static/job.js"),
    ),
    (
        "static/common.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/static/common.js"),
    ),
    (
        "static/ansi.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/static/ansi.js"),
    ),
];

/// Serves `/` (the job list), `/jobs/{id}` (one job) and `/static/*`.
pub(super) fn serve(path: &str) -> Result<Response<Body>, ApiError> {
    let name = match path {
        "/" | "/index.html" => "index.html",
        p if p.starts_with("/jobs/") && !p[6..].contains('/') => "job.html",
        p => p.trim_start_matches('/'),
    };
    let Some((_, content_type, contents)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return Err(ApiError::not_found("no such page"));
    };
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, *content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        // No inline script or style anywhere in web/, so the policy can forbid them;
        // the pages are never framed (clickjacking) and never send a Referer (a token
        // may travel in a URL).
        .header("content-security-policy", CONTENT_SECURITY_POLICY)
        .header("x-frame-options", "DENY")
        .header("referrer-policy", "no-referrer")
        .body(full(*contents))
        .expect("constant headers won't error"))
}

/// The dashboard's Content-Security-Policy: only its own scripts, styles and API.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
