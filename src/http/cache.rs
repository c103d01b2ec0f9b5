//! HTTP caching of history that can no longer change: the polling pages and the raw
//! log of a job that has finished. Once a job is terminal its events are all committed
//! (its final status event is its last), so any page of it, and its whole log, is the
//! same bytes forever: a strong `ETag`, a year's `immutable` lifetime (`public` with auth
//! off, so nginx's `proxy_cache` can keep it; `private` with auth on, so only the
//! reader's own browser does), and `If-None-Match` answered 304 before any read of
//! `agent_job_events`. Everything else stays `no-store` / `no-cache`.
//!
//! The tag names the gateway version (a new release may render the same history
//! differently), the job, its last seq and the request's query (which fixes the range
//! and the representation); the raw log's also names its content coding.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode};
use uuid::Uuid;

use super::body::full;
use super::Body;

/// A year, the longest lifetime caches are told to honour.
const IMMUTABLE: &str = "max-age=31536000, immutable";

/// The strong entity tag of a finished job's history as `what` (a route and its
/// representation) and `query` select it.
pub(super) fn etag(job: Uuid, last_seq: i64, what: &str, query: Option<&str>) -> String {
    format!(
        "\"{}-{}-{last_seq}-{what}-{:016x}\"",
        env!("CARGO_PKG_VERSION"),
        job.simple(),
        fnv1a(query.unwrap_or("").as_bytes())
    )
}

/// Whether the request's `If-None-Match` names `etag` (or is `*`). Weak tags compare
/// by their opaque part, as RFC 9110 says `If-None-Match` does.
pub(super) fn not_modified<B>(req: &Request<B>, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Marks a response as the immutable representation `etag`.
pub(super) fn mark(headers: &mut HeaderMap, etag: &str, auth_on: bool) {
    let scope = if auth_on { "private" } else { "public" };
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("{scope}, {IMMUTABLE}"))
            .expect("constant text is a header value"),
    );
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(etag).expect("an etag is printable ascii"),
    );
}

/// The 304 of a representation the client already holds.
pub(super) fn unchanged(etag: &str, auth_on: bool, vary: Option<&'static str>) -> Response<Body> {
    let mut res = Response::builder()
        .status(StatusCode::NOT_MODIFIED)
        .body(full(Vec::new()))
        .expect("constant status won't error");
    mark(res.headers_mut(), etag, auth_on);
    if let Some(vary) = vary {
        res.headers_mut()
            .insert(header::VARY, HeaderValue::from_static(vary));
    }
    res
}

/// FNV-1a, 64 bits: stable across builds and machines (std's hasher promises neither),
/// so every replica gives a page the same tag.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_matches() {
        let job = Uuid::nil();
        let a = etag(job, 10, "page", Some("afterSeq=0"));
        assert_eq!(a, etag(job, 10, "page", Some("afterSeq=0")));
        assert_ne!(a, etag(job, 11, "page", Some("afterSeq=0")));
        assert_ne!(a, etag(job, 10, "page", Some("afterSeq=1")));
        assert_ne!(a, etag(job, 10, "log-gzip", Some("afterSeq=0")));
        assert!(a.starts_with('"') && a.ends_with('"'));
        let req = |inm: &str| {
            Request::builder()
                .header(header::IF_NONE_MATCH, inm)
                .body(())
                .unwrap()
        };
        assert!(not_modified(&req(&a), &a));
        assert!(not_modified(&req(&format!("\"x\", W/{a}")), &a));
        assert!(not_modified(&req("*"), &a));
        assert!(!not_modified(&req("\"other\""), &a));
        assert!(!not_modified(&Request::new(()), &a));
    }
}
