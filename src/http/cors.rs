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

/// The CSRF check of a write authenticated by the cookie, which a browser attaches to
/// requests from any site: the request must be `application/json` (which an HTML form
/// cannot send, and which a script on another origin cannot send without a preflight,
/// refused above) and come from an allowed origin: the gateway's own (the `Origin`'s
/// host and port are the request's `Host`) or a `--cors-origin`.
///
/// Without `Origin`, `Sec-Fetch-Site` decides when present (`same-origin` or `none`
/// pass). With neither header the write passes: every browser that sends cookies
/// cross-site also sends `Origin` on a POST (and `Sec-Fetch-Site`), so such a request
/// comes from a program holding the cookie itself, which is not a forgery. Bearer and
/// `?access_token=` writes are not checked: a page on another site cannot make a
/// browser attach those.
pub(super) fn check_cookie_write<B>(config: &Config, req: &Request<B>) -> Result<(), ApiError> {
    let refused = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "a write authenticated by the cookie must come from the gateway's own origin \
             or an allowed one",
        )
    };
    let headers = req.headers();
    match headers.get(header::ORIGIN) {
        Some(origin) => {
            let text = origin.to_str().map_err(|_| refused())?;
            let listed = config.cors_origins.iter().any(|o| o == text);
            if !listed && !same_host(text, req) {
                return Err(refused());
            }
        }
        None => {
            if let Some(site) = headers.get("sec-fetch-site") {
                if !matches!(site.as_bytes(), b"same-origin" | b"none") {
                    return Err(refused());
                }
            }
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a write authenticated by the cookie must be sent as application/json",
        ));
    }
    Ok(())
}

/// Whether an `Origin` (`scheme://host[:port]`) names the host the request was sent to
/// (its `Host`, or the authority of an HTTP/2 request), default ports included.
fn same_host<B>(origin: &str, req: &Request<B>) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null", or not an origin at all
    };
    let default_port = match scheme {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok());
    let Some(host) = host else {
        return false;
    };
    let with_port = |a: &str| -> String {
        let a = a.to_ascii_lowercase();
        // A port is what follows the last ':' outside an IPv6 literal's brackets.
        let has_port = a.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
        if has_port {
            a
        } else {
            format!("{a}:{default_port}")
        }
    };
    with_port(authority) == with_port(host)
}
