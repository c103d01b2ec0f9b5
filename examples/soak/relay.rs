//! A loopback TCP relay to one PostgreSQL server, between one gateway replica and it,
//! that can go silent: while `blackhole` is on, the relayed connection that sent
//! `LISTEN` stops forwarding in both directions without closing (no FIN, no RST: a
//! stalled proxy, a NAT that forgot the flow). Its sockets are held until the hole is
//! closed again, then dropped; every other connection, and every new one, goes on.
//!
//! Only the LISTEN session is silenced: the relay's own kernel acknowledges whatever
//! the gateway sends, so TCP keepalive and `TCP_USER_TIMEOUT` can never fire through
//! it; what notices is the gateway's ping on that session (listen.rs). A pooled
//! connection on a really dead network is TCP's to notice (docs/reliability.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub port: u16,
    pub blackhole: Arc<AtomicBool>,
    /// Connections silenced so far.
    pub silenced: Arc<AtomicU64>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let silenced = Arc::new(AtomicU64::new(0));
        let (hole, count) = (blackhole.clone(), silenced.clone());
        // Lives as long as the soak process: the relay has no other owner.
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    // Upstream down (a failover): the client sees the close at once.
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let link = Arc::new(Link {
                    listens: AtomicBool::new(false),
                    silent: AtomicBool::new(false),
                });
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(
                    ri,
                    wo,
                    link.clone(),
                    hole.clone(),
                    count.clone(),
                    true,
                ));
                tokio::spawn(pipe(ro, wi, link, hole.clone(), count.clone(), false));
            }
        });
        Ok(Relay {
            port,
            blackhole,
            silenced,
        })
    }
}

/// What both directions of one relayed connection know.
struct Link {
    /// The client sent `LISTEN` on it.
    listens: AtomicBool,
    /// Already counted as silenced.
    silent: AtomicBool,
}

async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    link: Arc<Link>,
    blackhole: Arc<AtomicBool>,
    silenced: Arc<AtomicU64>,
    to_server: bool,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to_server && buf[..n].windows(6).any(|w| w == b"LISTEN") {
            link.listens.store(true, Ordering::SeqCst);
        }
        if link.listens.load(Ordering::SeqCst) && blackhole.load(Ordering::SeqCst) {
            if !link.silent.swap(true, Ordering::SeqCst) {
                silenced.fetch_add(1, Ordering::SeqCst);
            }
            // Silent: both sockets stay open and nothing is forwarded, until the hole
            // closes; then they are dropped (the gateway has long replaced them).
            while blackhole.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
