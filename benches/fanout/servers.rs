//! The two comparison servers that live in this bench, each run as a child process
//! (the bench binary re-executed with `FANOUT_ROLE`), so its CPU and memory are its own.
//!
//! - `floor`: the in-memory broadcaster of the issue: a publish encodes one frame, and
//!   `tokio::sync::broadcast` hands the shared `Bytes` to every stream. No database.
//!   A small ring per channel lets a client resume with `Last-Event-ID`.
//! - `polling`: the original design: each SSE connection reads the table every second
//!   with the gateway's own query and encoding.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::broadcast;
use uuid::Uuid;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Frames kept per floor channel for resumes.
const FLOOR_RING: usize = 4096;
/// Capacity of a floor channel, in frames.
const FLOOR_CAPACITY: usize = 4096;
/// Listen queue length (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;
/// The polling interval of the original design.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the server named by `role` until killed.
pub fn run(role: &str) {
    let addr: SocketAddr = std::env::var("FANOUT_LISTEN")
        .expect("FANOUT_LISTEN")
        .parse()
        .expect("a socket address");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async move {
        // A listen queue of 4096, not the 128 that `TcpListener::bind` gets from mio:
        // with 128, a reconnect storm overflows it and clients wait for SYN retries.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(addr).expect("bind");
        let listener = socket.listen(LISTEN_BACKLOG).expect("listen");
        match role {
            "floor" => {
                let floor = Arc::new(Floor::default());
                // Publishes come in on their own port, served by their own thread, so
                // the writer is never queued behind the fan-out it causes: the floor's
                // rate is the demanded one, as it should be for an upper bound.
                let publish: SocketAddr = std::env::var("FANOUT_PUBLISH_LISTEN")
                    .expect("FANOUT_PUBLISH_LISTEN")
                    .parse()
                    .expect("a socket address");
                let publisher = floor.clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("publish runtime")
                        .block_on(async move {
                            let listener = tokio::net::TcpListener::bind(publish)
                                .await
                                .expect("bind the publish port");
                            serve(listener, publisher, floor_handle).await
                        })
                });
                serve(listener, floor, floor_handle).await
            }
            "polling" => {
                let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
                let pool = eventgate::db::pool(&url, crate::systems::POOL_SIZE).expect("pool");
                let polling = Arc::new(Polling {
                    pool,
                    reads: AtomicU64::new(0),
                });
                serve(listener, polling, polling_handle).await
            }
            other => panic!("unknown role {other}"),
        }
    });
}

async fn serve<S, F, Fut>(listener: tokio::net::TcpListener, state: Arc<S>, handle: F)
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()).boxed_unsync())
        .expect("constant status won't error")
}

fn sse(stream: impl futures::Stream<Item = Bytes> + Send + 'static) -> Response<Body> {
    use futures::StreamExt;
    let body = StreamBody::new(stream.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed_unsync(body))
        .expect("constant headers won't error")
}

fn last_event_id(req: &Request<Incoming>) -> i64 {
    req.headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Default)]
struct Floor {
    channels: Mutex<HashMap<String, Arc<Channel>>>,
}

struct Channel {
    tx: broadcast::Sender<(i64, Bytes)>,
    /// Last seq and recent frames; a std Mutex, nothing awaits under it.
    state: Mutex<(i64, VecDeque<(i64, Bytes)>)>,
}

impl Floor {
    fn channel(&self, name: &str) -> Arc<Channel> {
        let mut channels = self.channels.lock().expect("floor lock");
        channels
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Channel {
                    tx: broadcast::channel(FLOOR_CAPACITY).0,
                    state: Mutex::new((0, VecDeque::new())),
                })
            })
            .clone()
    }
}

async fn floor_handle(floor: Arc<Floor>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if let Some(name) = path.strip_prefix("/pub/") {
        let channel = floor.channel(name);
        let Ok(body) = req.into_body().collect().await else {
            return full(StatusCode::BAD_REQUEST, "bad body");
        };
        let body = body.to_bytes();
        // Encode once: `{"seq":N,` + the published object without its `{`.
        let mut state = channel.state.lock().expect("channel lock");
        let seq = state.0 + 1;
        let mut frame = BytesMut::with_capacity(body.len() + 64);
        frame.extend_from_slice(
            format!("id: {seq}\nevent: queue_event\ndata: {{\"seq\":{seq},").as_bytes(),
        );
        frame.extend_from_slice(body.get(1..).unwrap_or_default());
        frame.extend_from_slice(b"\n\n");
        let frame = frame.freeze();
        state.0 = seq;
        state.1.push_back((seq, frame.clone()));
        if state.1.len() > FLOOR_RING {
            state.1.pop_front();
        }
        let _ = channel.tx.send((seq, frame));
        drop(state);
        return full(StatusCode::OK, seq.to_string());
    }
    if let Some(name) = path.strip_prefix("/sub/") {
        let after = last_event_id(&req);
        let channel = floor.channel(name);
        // Subscribe and copy the ring under one lock: nothing falls between.
        let (rx, backlog) = {
            let state = channel.state.lock().expect("channel lock");
            let backlog: Vec<Bytes> = if after > 0 {
                state
                    .1
                    .iter()
                    .filter(|(s, _)| *s > after)
                    .map(|(_, b)| b.clone())
                    .collect()
            } else {
                Vec::new()
            };
            (channel.tx.subscribe(), backlog)
        };
        let live = futures::stream::unfold((rx, after), |(mut rx, cursor)| async move {
            loop {
                match rx.recv().await {
                    Ok((seq, frame)) if seq > cursor => return Some((frame, (rx, seq))),
                    Ok(_) => continue,
                    // The floor does not resync: a lagging client shows gaps.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        let head = futures::stream::iter(
            std::iter::once(Bytes::from_static(b"retry: 2000\n\n")).chain(backlog),
        );
        use futures::StreamExt;
        return sse(head.chain(live));
    }
    full(StatusCode::NOT_FOUND, "not found")
}

struct Polling {
    pool: deadpool_postgres::Pool,
    reads: AtomicU64,
}

async fn polling_handle(polling: Arc<Polling>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/metrics" {
        let reads = polling.reads.load(Ordering::Relaxed);
        return full(StatusCode::OK, format!("polling_reads_total {reads}\n"));
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["api", "queue", "jobs", id, "events", "stream"] = parts[..] else {
        return full(StatusCode::NOT_FOUND, "not found");
    };
    let Ok(job) = id.parse::<Uuid>() else {
        return full(StatusCode::BAD_REQUEST, "bad id");
    };
    let cursor = last_event_id(&req);
    let first = futures::stream::once(async { Bytes::from_static(b"retry: 2000\n\n") });
    // Read at once, then every second, the query of the original design.
    let polls = futures::stream::unfold(
        (polling, cursor, tokio::time::Instant::now()),
        move |(polling, mut cursor, mut next)| async move {
            loop {
                tokio::time::sleep_until(next).await;
                let Ok(client) = polling.pool.get().await else {
                    continue;
                };
                polling.reads.fetch_add(1, Ordering::Relaxed);
                let Ok(events) =
                    eventgate::store::events_after(&client, job, cursor, None, 1000).await
                else {
                    continue;
                };
                drop(client);
                // Like the original: the next poll a second after this one ended.
                next = tokio::time::Instant::now() + POLL_INTERVAL;
                if let Some(last) = events.last() {
                    cursor = last.seq;
                    let batch = eventgate::sse::Batch::encode(&events, false);
                    if let Some(bytes) = batch.after(i64::MIN) {
                        return Some((bytes, (polling, cursor, next)));
                    }
                }
            }
        },
    );
    use futures::StreamExt;
    sse(first.chain(polls))
}
