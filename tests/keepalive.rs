//! Keep-alives spread over the interval: the gateway's one keep-alive timer reaches one
//! group of jobs per tick, so a process holding tens of thousands of streams does not
//! wake them all at the same instant. Every stream still gets one comment per
//! interval, and the first a whole interval after its job joined the hub.

mod common;

use std::time::{Duration, Instant};

use common::*;
use eventgate::config::Config;

/// The keep-alive interval of the test gateway: 16 ticks of 150 ms.
const INTERVAL: Duration = Duration::from_millis(2400);

/// Reads until the stream's `n`th keep-alive comment; when each one arrived.
async fn keep_alives(sse: &mut Sse, n: usize) -> Vec<Instant> {
    let mut seen = Vec::new();
    let mut counted = 0;
    for _ in 0..200 {
        sse.next_raw().await;
        let total = sse.raw.windows(12).filter(|w| w == b": keep-alive").count();
        while counted < total {
            counted += 1;
            seen.push(Instant::now());
        }
        if seen.len() >= n {
            break;
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_of_jobs_joined_at_different_times_go_out_at_different_ticks() {
    let url = database().await;
    let db = eventgate::db::connect(&url).await.unwrap();
    let mut config = Config::new(&url);
    config.keep_alive = INTERVAL;
    let gateway = Gateway::start_with(config).await;

    // Given two jobs whose first subscribers came about a third of an interval apart,
    let (a, b) = (create_job(&db).await, create_job(&db).await);
    let a_opened = Instant::now();
    let mut sa = Sse::job(gateway.addr, a, None).await;
    tokio::time::sleep(INTERVAL / 3).await;
    let b_opened = Instant::now();
    let mut sb = Sse::job(gateway.addr, b, None).await;

    // when both wait for two keep-alives,
    let (ka, kb) = tokio::join!(keep_alives(&mut sa, 2), keep_alives(&mut sb, 2));
    assert_eq!(
        (ka.len(), kb.len()),
        (2, 2),
        "each stream got two keep-alives"
    );

    // then each stream's first comes most of an interval after it opened (not at the
    // next tick), the next one interval later, and the two jobs' are not sent together.
    let tick = INTERVAL / 16;
    for (name, opened, k) in [("a", a_opened, &ka), ("b", b_opened, &kb)] {
        let first = k[0] - opened;
        let gap = k[1] - k[0];
        println!("{name}: first keep-alive after {first:?}, the next {gap:?} later");
        assert!(
            first >= INTERVAL - 2 * tick,
            "{name}: first keep-alive after {first:?}, before its round ({INTERVAL:?})"
        );
        assert!(
            gap >= INTERVAL - 2 * tick,
            "{name}: keep-alives {gap:?} apart, more than one per {INTERVAL:?}"
        );
    }
    let apart = if kb[0] > ka[0] {
        kb[0] - ka[0]
    } else {
        ka[0] - kb[0]
    };
    assert!(
        apart >= 2 * tick,
        "the two jobs' keep-alives went out {apart:?} apart: one sweep, not staggered"
    );
    gateway.stop().await;
}
