//! Bodies: the one response body type, its helpers, and reading request bodies within
//! their budget.

use std::convert::Infallible;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper::{Request, Response, StatusCode};

use super::error::{ApiError, Result};

/// Every response body: full buffers and SSE streams alike.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A request body: hyper's `Incoming`, `Empty` for the event-stream requests that
/// [`crate::conn`] reads itself, or a `Full` in tests that call the app without a
/// socket.
pub trait RequestBody: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static {}
impl<T: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static> RequestBody for T {}

/// Bodies up to this size are read and dropped before a 413 (see [`read_json`]).
const DISCARD_LIMIT: u64 = 64 << 20;
/// How long reading a refused body may take.
const DISCARD_TIMEOUT: Duration = Duration::from_secs(10);

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("json always serializes");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("constant headers won't error")
}

/// Reads a JSON body, refusing more than `max` bytes with 413, and a body that has not
/// all arrived within `timeout` with 408 (and a close: see [`ApiError::response`]).
pub(crate) async fn read_json<T: serde::de::DeserializeOwned, B: RequestBody>(
    req: Request<B>,
    max: usize,
    timeout: Duration,
) -> Result<T> {
    match tokio::time::timeout(timeout, read_json_now(req, max)).await {
        Ok(read) => read,
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs_f64()
            ),
        )),
    }
}

async fn read_json_now<T: serde::de::DeserializeOwned, B: RequestBody>(
    req: Request<B>,
    max: usize,
) -> Result<T> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            // Read (and drop) a body of reasonable size before answering: closing a
            // socket with unread data resets it, and the client may never see the 413.
            if len <= DISCARD_LIMIT {
                discard(req.into_body()).await;
            }
            return Err(too_large());
        }
    }
    let mut body = req.into_body();
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            ApiError::bad_request("invalid_body", "could not read the request body")
        })?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > max {
                discard(body).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(data);
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_body", format!("invalid json: {e}")))
}

/// Reads a body to its end (or `DISCARD_LIMIT`, or `DISCARD_TIMEOUT`), keeping nothing.
async fn discard<B: RequestBody>(body: B) {
    let drain = async {
        let mut body = body;
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen += data.len() as u64;
                if seen > DISCARD_LIMIT {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}
