//! The results: one [`Row`] per system and case, written as JSON, a Markdown table and
//! an SVG chart (deliveries/s and p99 against subscribers, one line per system).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

/// One system under one case.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: String,
    /// `idle`, `fanout`, `many_jobs` or `storm`.
    pub case: String,
    pub subscribers: usize,
    pub jobs: usize,
    /// Events per second written, over all jobs.
    pub rate: f64,
    /// Deliveries per second asked for: `rate * subscribers / jobs`.
    pub demand_per_s: f64,
    pub deliveries_per_s: f64,
    /// `deliveries_per_s / demand_per_s`.
    pub demand_met: f64,
    /// Events per second the writers actually committed or published.
    pub written_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Events missing below the highest one a stream received (summed over streams).
    pub gaps: u64,
    /// Events received twice by one stream.
    pub dups: u64,
    /// Events that came after a higher seq on the same stream.
    pub reorders: u64,
    /// Events written but not received by the end of the drain.
    pub undelivered: u64,
    /// Server CPU over the measured window; 200 % is both cores (shared with the
    /// client, PostgreSQL and the writers).
    pub cpu_pct: f64,
    /// The bench process (client and writers) over the same window.
    pub client_cpu_pct: f64,
    /// The machine's 1-minute load average when the case ended.
    pub load: f64,
    /// Server memory growth over its baseline before the streams opened, per stream.
    pub rss_per_conn_kib: f64,
    /// Table reads per written batch (the gateway's live reads; polling's polls).
    pub reads_per_batch: Option<f64>,
    /// Backfill reads during the case (the gateway; the storm should need none).
    pub backfill_reads: Option<u64>,
    /// Reconnect storm: disconnect to new response head, p50 and p99.
    pub reconnect_p50_ms: Option<f64>,
    pub reconnect_p99_ms: Option<f64>,
    /// Streams that ended on their own and were resumed, and non-200 answers.
    pub drops: u64,
    pub http_errors: u64,
    /// Connections the kernel dropped at a full listen queue during the case (the
    /// client retries after a second: this is what long reconnects are made of).
    pub listen_overflows: u64,
    /// Server CPU while the streams were open and nothing was written (keep-alives
    /// only), where a case measures it; summed over replicas.
    pub idle_cpu_pct: Option<f64>,
    /// Per replica: deliveries/s to its streams and its CPU %, where there are several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<(f64, f64)>,
    pub note: String,
}

pub fn write_all(dir: &Path, rows: &[Row], notes: &[String], header: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("fanout.json"),
        serde_json::to_string_pretty(rows).expect("rows serialize"),
    )?;
    std::fs::write(dir.join("fanout.md"), markdown(rows, notes, header))?;
    std::fs::write(dir.join("fanout.svg"), svg(rows))?;
    if rows.iter().any(|r| SCALE_CASES.contains(&r.case.as_str())) {
        std::fs::write(dir.join("fanout-scale.svg"), scale_svg(rows))?;
    }
    Ok(())
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Thousands as `12.3k`, millions as `1.02M`.
fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

pub fn markdown(rows: &[Row], notes: &[String], header: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Fan-out benchmark\n\n{header}\n");
    let _ = writeln!(
        out,
        "| system | case | subs | jobs | ev/s | deliveries/s | of demand | p50 ms | p99 ms | max ms \
         | gaps | dups | undelivered | CPU % | client CPU % | KiB/conn | reads/batch | note |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for r in rows {
        let mut note = r.note.clone();
        if let (Some(p50), Some(p99)) = (r.reconnect_p50_ms, r.reconnect_p99_ms) {
            note = format!("reconnect p50 {p50:.0} / p99 {p99:.0} ms; {note}");
        }
        if let Some(b) = r.backfill_reads {
            if r.case == "storm" {
                note = format!("{b} backfill reads; {note}");
            }
        }
        if r.listen_overflows > 0 {
            note = format!("{} listen-queue overflows; {note}", r.listen_overflows);
        }
        if r.drops > 0 || r.http_errors > 0 {
            note = format!("{} drops, {} non-200; {note}", r.drops, r.http_errors);
        }
        let idle = r.case == "idle";
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
            r.system,
            r.case,
            r.subscribers,
            r.jobs,
            r.rate,
            if idle { "-".into() } else { si(r.deliveries_per_s) },
            if idle { "-".into() } else { format!("{:.1} %", r.demand_met * 100.0) },
            if idle { "-".into() } else { format!("{:.1}", r.p50_ms) },
            if idle { "-".into() } else { format!("{:.1}", r.p99_ms) },
            if idle { "-".into() } else { format!("{:.0}", r.max_ms) },
            r.gaps,
            r.dups,
            r.undelivered,
            r.cpu_pct,
            r.client_cpu_pct,
            r.rss_per_conn_kib,
            opt(r.reads_per_batch, 2),
            note.trim_end_matches("; ").trim(),
        );
    }
    let ratios = ratios(rows);
    if !ratios.is_empty() {
        let _ = writeln!(out, "\n## eventgate against Nchan and the floor\n");
        let _ = writeln!(
            out,
            "| case | subs | ev/s | deliveries vs nchan | p99 vs nchan | p99 vs floor | deliveries vs floor |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for line in ratios {
            let _ = writeln!(out, "{line}");
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    out
}

fn find<'a>(rows: &'a [Row], system: &str, like: &Row) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.system == system
            && r.case == like.case
            && r.subscribers == like.subscribers
            && r.jobs == like.jobs
            && r.rate == like.rate
    })
}

fn ratios(rows: &[Row]) -> Vec<String> {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}x", a / b)
        } else {
            "-".into()
        }
    };
    rows.iter()
        .filter(|r| r.system == "eventgate" && r.case != "idle")
        .map(|g| {
            let n = find(rows, "nchan", g);
            let f = find(rows, "floor", g);
            format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                g.case,
                g.subscribers,
                g.rate,
                n.map_or("-".into(), |n| ratio(
                    g.deliveries_per_s,
                    n.deliveries_per_s
                )),
                n.map_or("-".into(), |n| ratio(g.p99_ms, n.p99_ms)),
                f.map_or("-".into(), |f| ratio(g.p99_ms, f.p99_ms)),
                f.map_or("-".into(), |f| ratio(
                    g.deliveries_per_s,
                    f.deliveries_per_s
                )),
            )
        })
        .collect()
}

const COLORS: [(&str, &str); 4] = [
    ("eventgate", "#d62728"),
    ("nchan", "#1f77b4"),
    ("polling", "#7f7f7f"),
    ("floor", "#2ca02c"),
];

/// Two rows of panels (deliveries/s, p99 on a log scale) by one column per rate of the
/// one-job fan-out case; x is subscribers.
pub fn svg(rows: &[Row]) -> String {
    let fanout: Vec<&Row> = rows.iter().filter(|r| r.case == "fanout").collect();
    let mut rates: Vec<f64> = fanout.iter().map(|r| r.rate).collect();
    rates.sort_by(f64::total_cmp);
    rates.dedup();
    let mut subs: Vec<usize> = fanout.iter().map(|r| r.subscribers).collect();
    subs.sort();
    subs.dedup();
    let (pw, ph, ml, mt) = (300.0, 200.0, 70.0, 50.0);
    let cols = rates.len().max(1);
    let width = ml + cols as f64 * (pw + 70.0) + 120.0;
    let height = mt + 2.0 * (ph + 70.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{ml}" y="22" font-size="15">Fan-out, 1 job: deliveries/s (top) and p99 latency (bottom, log) against subscribers</text>"#
    );
    let max_deliv = fanout
        .iter()
        .map(|r| r.deliveries_per_s.max(r.demand_per_s))
        .fold(1.0, f64::max);
    let max_p99 = fanout.iter().map(|r| r.p99_ms).fold(10.0, f64::max);
    let min_p99 = fanout
        .iter()
        .map(|r| r.p99_ms)
        .filter(|v| *v > 0.0)
        .fold(max_p99, f64::min)
        .max(0.1);
    let (lo, hi) = (
        min_p99.log10().floor(),
        max_p99.log10().ceil().max(min_p99.log10().floor() + 1.0),
    );
    let max_sub = *subs.last().unwrap_or(&1) as f64;
    let x_of = |x0: f64, s: usize| x0 + (s as f64 / max_sub) * pw;
    for (c, rate) in rates.iter().enumerate() {
        let x0 = ml + c as f64 * (pw + 70.0);
        for panel in 0..2 {
            let y0 = mt + panel as f64 * (ph + 70.0);
            let title = if panel == 0 {
                format!("{rate} events/s: deliveries/s")
            } else {
                format!("{rate} events/s: p99 ms")
            };
            let _ = writeln!(
                out,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{x0}" y="{}">{title}</text>"##,
                y0 - 6.0
            );
            // Axes labels.
            for s in &subs {
                let _ = writeln!(
                    out,
                    r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                    x_of(x0, *s),
                    y0 + ph + 14.0,
                    si(*s as f64)
                );
            }
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">subscribers</text>"#,
                x0 + pw / 2.0,
                y0 + ph + 28.0
            );
            let y_of = |v: f64| -> f64 {
                if panel == 0 {
                    y0 + ph - (v / max_deliv) * ph
                } else {
                    let l = v.max(10f64.powf(lo)).log10();
                    y0 + ph - (l - lo) / (hi - lo) * ph
                }
            };
            let ticks: Vec<f64> = if panel == 0 {
                (0..=4).map(|i| max_deliv * i as f64 / 4.0).collect()
            } else {
                (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
            };
            for t in ticks {
                let y = y_of(t);
                let _ = writeln!(
                    out,
                    r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                    x0 + pw,
                    x0 - 4.0,
                    y + 4.0,
                    si(t)
                );
            }
            if panel == 0 {
                // The demand, dashed.
                let pts: Vec<String> = subs
                    .iter()
                    .map(|s| format!("{:.1},{:.1}", x_of(x0, *s), y_of(rate * *s as f64)))
                    .collect();
                let _ = writeln!(
                    out,
                    r##"<polyline points="{}" fill="none" stroke="#bbb" stroke-dasharray="4 3"/>"##,
                    pts.join(" ")
                );
            }
            for (system, color) in COLORS {
                let mut pts: Vec<(usize, f64)> = fanout
                    .iter()
                    .filter(|r| r.system == system && r.rate == *rate)
                    .map(|r| {
                        (
                            r.subscribers,
                            if panel == 0 {
                                r.deliveries_per_s
                            } else {
                                r.p99_ms
                            },
                        )
                    })
                    .collect();
                pts.sort_by_key(|p| p.0);
                if pts.is_empty() {
                    continue;
                }
                let line: Vec<String> = pts
                    .iter()
                    .map(|(s, v)| format!("{:.1},{:.1}", x_of(x0, *s), y_of(*v)))
                    .collect();
                let _ = writeln!(
                    out,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
                    line.join(" ")
                );
                for (s, v) in &pts {
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                        x_of(x0, *s),
                        y_of(*v)
                    );
                }
            }
        }
    }
    let lx = ml + cols as f64 * (pw + 70.0);
    for (i, (system, color)) in COLORS.iter().enumerate() {
        let y = mt + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{system}</text>"#,
            lx + 20.0,
            lx + 25.0,
            y + 4.0
        );
    }
    let y = mt + 10.0 + 4.0 * 18.0;
    let _ = writeln!(
        out,
        r##"<line x1="{lx}" x2="{}" y1="{y}" y2="{y}" stroke="#bbb" stroke-dasharray="4 3"/><text x="{}" y="{}">demand</text>"##,
        lx + 20.0,
        lx + 25.0,
        y + 4.0
    );
    out.push_str("</svg>\n");
    out
}

/// The cases past one process's descriptor limit.
pub const SCALE_CASES: [&str; 3] = ["limit", "replicas", "replica_storm"];

/// A panel of bars: its title, `(label, value)` per bar, and the goal line if any.
type Panel = (String, Vec<(String, f64)>, Option<f64>);

/// The scale cases as bars against their goals: KiB per stream (3), idle CPU (5 % for
/// all replicas), p99 (250 ms), and each replica's share of deliveries and CPU.
pub fn scale_svg(rows: &[Row]) -> String {
    let scale: Vec<&Row> = rows
        .iter()
        .filter(|r| SCALE_CASES.contains(&r.case.as_str()))
        .collect();
    let label = |r: &Row| format!("{} {} ({})", r.system, r.case, r.subscribers);
    let (bar_h, gap, lw, pw) = (16.0, 6.0, 230.0, 260.0);
    let mut panels: Vec<Panel> = vec![
        (
            "KiB per stream (goal 3)".into(),
            scale
                .iter()
                .filter(|r| r.case != "replica_storm")
                .map(|r| (label(r), r.rss_per_conn_kib))
                .collect(),
            Some(3.0),
        ),
        (
            "idle CPU % with keep-alives (goal 5, all replicas)".into(),
            scale
                .iter()
                .filter_map(|r| Some((label(r), r.idle_cpu_pct?)))
                .collect(),
            Some(5.0),
        ),
        (
            "p99 commit-to-receive ms (goal 250)".into(),
            scale.iter().map(|r| (label(r), r.p99_ms)).collect(),
            Some(250.0),
        ),
    ];
    if let Some(r) = scale.iter().find(|r| !r.replicas.is_empty()) {
        panels.push((
            "per replica: deliveries/s (k)".into(),
            r.replicas
                .iter()
                .enumerate()
                .map(|(i, (d, _))| (format!("replica {}", i + 1), d / 1000.0))
                .collect(),
            None,
        ));
        panels.push((
            "per replica: CPU % while delivering".into(),
            r.replicas
                .iter()
                .enumerate()
                .map(|(i, (_, c))| (format!("replica {}", i + 1), *c))
                .collect(),
            None,
        ));
    }
    panels.retain(|p| !p.1.is_empty());
    let heights: Vec<f64> = panels
        .iter()
        .map(|p| 40.0 + p.1.len() as f64 * (bar_h + gap))
        .collect();
    let width = lw + pw + 90.0;
    let height = 40.0 + heights.iter().sum::<f64>();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="15">Past one process's descriptor limit: the scale cases against their goals</text>"#
    );
    let mut y = 40.0;
    for ((title, bars, goal), h) in panels.iter().zip(&heights) {
        let _ = writeln!(
            out,
            r#"<text x="10" y="{}" font-size="13">{title}</text>"#,
            y + 18.0
        );
        let max = bars
            .iter()
            .map(|b| b.1)
            .chain(*goal)
            .fold(f64::MIN_POSITIVE, f64::max)
            * 1.1;
        for (i, (name, v)) in bars.iter().enumerate() {
            let by = y + 28.0 + i as f64 * (bar_h + gap);
            let w = (v / max * pw).max(0.5);
            let over = goal.is_some_and(|g| *v > g);
            let _ = writeln!(
                out,
                r#"<text x="{}" y="{}" text-anchor="end">{name}</text><rect x="{lw}" y="{by}" width="{w:.1}" height="{bar_h}" fill="{}"/><text x="{:.1}" y="{}">{v:.1}</text>"#,
                lw - 6.0,
                by + 12.0,
                if over { "#d62728" } else { "#1f77b4" },
                lw + w + 4.0,
                by + 12.0
            );
        }
        if let Some(g) = goal {
            let gx = lw + g / max * pw;
            let _ = writeln!(
                out,
                r##"<line x1="{gx:.1}" x2="{gx:.1}" y1="{}" y2="{}" stroke="#2ca02c" stroke-dasharray="4 3"/>"##,
                y + 24.0,
                y + h - 6.0
            );
        }
        y += h;
    }
    let _ = writeln!(out, "</svg>");
    out
}
