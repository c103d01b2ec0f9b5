//! `eventgate run` against a real PostgreSQL: the real binary (and the library API)
//! running real commands, then what the table holds.

mod common_worker;

use base64::Engine;
use common_worker::*;
use eventgate::cluster::{Cluster, Options};
use eventgate::worker::{Status, Worker, REDACTED, SPLIT_MARKER};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_stored_once_in_order_in_few_rows() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let code = run(&url, job, &[], &["seq", "1", "300000"]).await;

    assert_eq!(code, 0);
    assert_eq!(status(&url, job).await.as_deref(), Some("succeeded"));
    let events = events(&url, job).await;
    let expected: Vec<String> = (1..=300_000).map(|i| i.to_string()).collect();
    assert_eq!(lines(&events, "stdout"), expected);
    let log_rows = events.iter().filter(|e| e.kind() == "log").count();
    assert!(
        log_rows * 100 < expected.len(),
        "{log_rows} rows for 300000 lines"
    );
    let counted: u64 = events
        .iter()
        .filter(|e| e.kind() == "log")
        .map(|e| e.payload["lines"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 300_000, "payload.lines adds up");
    assert_eq!(events[0].payload["status"], "running");
    assert_eq!(final_status(&events)["exitCode"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_trickle_is_stored_once_in_order() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let code = run_sh(
        &url,
        job,
        &[],
        "for i in 1 2 3 4 5 6; do echo \"tick $i\"; echo \"tock $i\" >&2; sleep 0.15; done",
    )
    .await;

    assert_eq!(code, 0);
    let events = events(&url, job).await;
    let ticks: Vec<String> = (1..=6).map(|i| format!("tick {i}")).collect();
    let tocks: Vec<String> = (1..=6).map(|i| format!("tock {i}")).collect();
    assert_eq!(lines(&events, "stdout"), ticks);
    assert_eq!(lines(&events, "stderr"), tocks);
    let levels: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.kind() == "log")
        .map(|e| (e.stream(), e.level.as_str()))
        .collect();
    assert!(levels.iter().all(|&(_, level)| level == "info"));
}

#[tokio::test(flavor = "multi_thread")]
async fn output_is_decoded_as_a_terminal_shows_it() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    // A character split across two writes (and reads), NUL, invalid UTF-8, `\r`
    // progress, CRLF, ANSI colours, and a last line without newline.
    let script = r"printf 'caf\303'; sleep 0.3; printf '\251 ok\n';
        printf 'a\000b\n';
        printf 'bad \377 byte\n';
        printf ' 10%%\r 50%%\r100%%\n';
        printf 'dos\r\n';
        printf '\033[31mred\033[0m\n';
        printf 'no newline'";
    let code = run_sh(&url, job, &[], script).await;

    assert_eq!(code, 0);
    let events = events(&url, job).await;
    assert_eq!(
        lines(&events, "stdout"),
        vec![
            "café ok",
            "a\u{2400}b",
            "bad \u{FFFD} byte",
            "100%",
            "dos",
            "\u{1b}[31mred\u{1b}[0m",
            "no newline",
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_mebibyte_line_is_cut_with_a_marker_and_loses_nothing() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let script = "echo before; head -c 1048576 /dev/zero | tr '\\0' 'x'; echo; echo after";
    let code = run_sh(&url, job, &[], script).await;

    assert_eq!(code, 0);
    let events = events(&url, job).await;
    let lines = lines(&events, "stdout");
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], "before");
    assert_eq!(lines[1], "x".repeat(1 << 20));
    assert_eq!(lines[2], "after");
    let pieces = events
        .iter()
        .flat_map(|e| e.message.split('\n'))
        .filter(|l| l.ends_with(SPLIT_MARKER))
        .count();
    assert!(pieces >= 16, "the line was cut into pieces ({pieces})");
    let longest = events.iter().map(|e| e.message.len()).max().unwrap();
    assert!(longest <= eventgate::worker::DEFAULT_MAX_EVENT_BYTES);
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_in_every_form_never_reach_the_table() {
    let url = fresh_database().await;
    let job = create_job(&url).await;
    let env_secret = "s3cr3t/value+with spaces";
    let flag_secret = "flag-secret-4242";
    let b64 = base64::engine::general_purpose::STANDARD;
    let github = format!("ghp_{}", &"A1b2C3d4E5".repeat(4)[..36]);
    let aws = "AKIAIOSFODNN7EXAMPLE";

    // Printed in many forms, on both streams, and across reads (a `sleep` between
    // the two halves of a secret).
    let script = r#"
        echo "plain $MY_API_TOKEN end"
        printf '%s' "$MY_API_TOKEN" | base64
        printf 'user:%s' "$MY_API_TOKEN" | base64
        echo "url s3cr3t%2Fvalue%2Bwith%20spaces and s3cr3t%2fvalue%2bwith+spaces"
        echo "flag $FLAG_VALUE" >&2
        printf '%s\n' "$FLAG_VALUE" | base64 >&2
        printf 'split s3cr3t/val'; sleep 0.3; printf 'ue+with spaces done\n'
        echo "github $GH and aws $AWS"
        echo "Authorization: Bearer abcdefghijklmnop123"
        echo "-----BEGIN OPENSSH PRIVATE KEY-----"
        echo "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
        echo "-----END OPENSSH PRIVATE KEY-----"
        echo "short abc stays"
    "#;
    let code = worker(&url, job, &["--redact", flag_secret], &["sh", "-c", script])
        .env("MY_API_TOKEN", env_secret)
        .env("FLAG_VALUE", flag_secret)
        .env("GH", &github)
        .env("AWS", aws)
        .env("SHORT_TOKEN", "abc")
        .status()
        .await
        .unwrap()
        .code();

    assert_eq!(code, Some(0));
    let stored = everything_stored(&url, job).await;
    let forbidden = [
        env_secret.to_string(),
        b64.encode(env_secret),
        b64.encode(format!("user:{env_secret}"))[8..].to_string(),
        "s3cr3t%2Fvalue%2Bwith%20spaces".to_string(),
        "s3cr3t%2fvalue%2bwith+spaces".to_string(),
        flag_secret.to_string(),
        b64.encode(format!("{flag_secret}\n"))[..20].to_string(),
        github.clone(),
        aws.to_string(),
        "abcdefghijklmnop123".to_string(),
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ".to_string(),
    ];
    for secret in &forbidden {
        assert!(
            !stored.contains(secret.as_str()),
            "{secret} leaked:\n{stored}"
        );
    }
    let events = events(&url, job).await;
    let out = lines(&events, "stdout");
    assert!(out.contains(&format!("plain {REDACTED} end")), "{out:?}");
    assert!(out.contains(&format!("split {REDACTED} done")), "{out:?}");
    assert!(out.contains(&"Authorization: Bearer [REDACTED]".to_string()));
    assert!(
        out.contains(&"short abc stays".to_string()),
        "short values stay"
    );
    assert_eq!(
        lines(&events, "stderr")[0],
        format!("flag {REDACTED}"),
        "stderr is redacted too"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_code_three_is_failed_and_passed_on() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let code = run_sh(&url, job, &[], "echo working; exit 3").await;

    assert_eq!(code, 3);
    assert_eq!(status(&url, job).await.as_deref(), Some("failed"));
    let events = events(&url, job).await;
    let last = final_status(&events);
    assert_eq!(last["status"], "failed");
    assert_eq!(last["exitCode"], 3);
    assert_eq!(events.last().unwrap().level, "error");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_killed_by_a_signal_is_failed() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let code = run_sh(&url, job, &[], "echo dying; kill -KILL $$").await;

    assert_eq!(code, 128 + 9);
    assert_eq!(status(&url, job).await.as_deref(), Some("failed"));
    let events = events(&url, job).await;
    let last = final_status(&events);
    assert_eq!(last["signal"], 9);
    assert_eq!(last["signalName"], "SIGKILL");
    assert_eq!(lines(&events, "stdout"), vec!["dying"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_worker_stops_the_command_and_records_cancelled() {
    let url = fresh_database().await;
    let job = create_job(&url).await;
    let mut worker = worker(
        &url,
        job,
        &["--kill-grace", "5s"],
        &["sh", "-c", "echo started; sleep 600; echo never"],
    )
    .spawn()
    .unwrap();

    // The first line of a quiet command reaches the table while it still runs.
    wait_for_line(&url, job, "started").await;
    assert_eq!(status(&url, job).await.as_deref(), Some("running"));
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(worker.id().unwrap() as i32, libc::SIGTERM) };
    let exit = worker.wait().await.unwrap();

    assert_eq!(exit.code(), Some(128 + 15));
    assert_eq!(status(&url, job).await.as_deref(), Some("cancelled"));
    let events = events(&url, job).await;
    assert_eq!(lines(&events, "stdout"), vec!["started"]);
    assert_eq!(final_status(&events)["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread")]
async fn create_makes_the_job_and_an_unknown_job_is_refused() {
    let url = fresh_database().await;
    let job = Uuid::new_v4();

    let refused = run_sh(&url, job, &[], "echo never").await;
    assert_eq!(refused, eventgate::worker::EXIT_WORKER_ERROR);
    assert_eq!(status(&url, job).await, None);

    let code = run_sh(&url, job, &["--create", "--stage", "build"], "echo made").await;
    assert_eq!(code, 0);
    let events = events(&url, job).await;
    let log = events.iter().find(|e| e.kind() == "log").unwrap();
    assert_eq!(log.payload["stage"], "build");
    assert_eq!(log.payload["stream"], "stdout");
    assert_eq!(log.payload["lines"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_command_is_failed_with_127() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let code = run(&url, job, &[], &["/nonexistent/command"]).await;

    assert_eq!(code, 127);
    assert_eq!(status(&url, job).await.as_deref(), Some("failed"));
    let events = events(&url, job).await;
    assert!(lines(&events, "stderr")[0].contains("cannot run"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_library_runs_a_command_into_a_job() {
    let url = fresh_database().await;
    let job = Uuid::new_v4();

    let outcome = Worker::builder(url.clone(), job)
        .create(true)
        .stage("lib")
        .step(Some("s1".into()), Some(2))
        .redact("library-secret")
        .build()
        .run(&[
            "sh".into(),
            "-c".into(),
            "echo out library-secret; echo err >&2; exit 4".into(),
        ])
        .await
        .unwrap();

    assert_eq!(outcome.status, Status::Failed);
    assert_eq!(outcome.exit_code, 4);
    assert_eq!(outcome.lines, 2);
    let events = events(&url, job).await;
    assert_eq!(lines(&events, "stdout"), vec![format!("out {REDACTED}")]);
    assert_eq!(lines(&events, "stderr"), vec!["err"]);
    let log = events.iter().find(|e| e.kind() == "log").unwrap();
    assert_eq!(log.payload["stepId"], "s1");
    assert_eq!(log.payload["stepIndex"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_acceptance_script_fails_with_3_and_keeps_every_line() {
    let url = fresh_database().await;
    let job = Uuid::new_v4();
    let secret = "acceptance-secret-value";
    let dir = std::env::temp_dir().join(format!("eventgate-acceptance-{job}"));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("script.sh");
    std::fs::write(
        &script,
        r#"i=0
while [ $i -lt 50000 ]; do i=$((i+1)); echo "line $i"; done
printf 'split \342\202'; sleep 0.2; printf '\254 euro\n'
printf 'nul\000here\n'
echo "secret $DEPLOY_PASSWORD" >&2
printf '%s' "$DEPLOY_PASSWORD" | base64 >&2
exit 3
"#,
    )
    .unwrap();

    let mut cmd = worker(&url, job, &["--create"], &["sh", script.to_str().unwrap()]);
    let code = cmd
        .env("DEPLOY_PASSWORD", secret)
        .status()
        .await
        .unwrap()
        .code();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(code, Some(3));
    assert_eq!(status(&url, job).await.as_deref(), Some("failed"));
    let events = events(&url, job).await;
    let mut expected: Vec<String> = (1..=50_000).map(|i| format!("line {i}")).collect();
    expected.push("split € euro".into());
    expected.push("nul\u{2400}here".into());
    assert_eq!(lines(&events, "stdout"), expected);
    assert!(events.len() < 1000, "{} rows", events.len());
    let stored = everything_stored(&url, job).await;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(!stored.contains(secret) && !stored.contains(&b64));
}

/// A cluster of its own: restarting the shared one would break the other tests.
fn own_cluster() -> Cluster {
    Cluster::start(Options::default()).expect("start postgresql")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_during_a_run_loses_nothing() {
    let cluster = own_cluster();
    let url = fresh_database_on(&cluster.url()).await;
    let job = create_job(&url).await;
    let script = "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo \"n $i\"; \
                  if [ $i = 20 ]; then sleep 1; fi; sleep 0.01; done";
    let worker = worker(&url, job, &[], &["sh", "-c", script])
        .spawn()
        .unwrap();

    wait_for_line(&url, job, "n 1").await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.restart().expect("restart");
        cluster
    })
    .await
    .unwrap();
    let out = worker.wait_with_output().await.unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("database unreachable"),
        "the restart was felt: {stderr}"
    );
    assert_eq!(status(&url, job).await.as_deref(), Some("succeeded"));
    let events = events(&url, job).await;
    let expected: Vec<String> = (1..=400).map(|i| format!("n {i}")).collect();
    assert_eq!(lines(&events, "stdout"), expected);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_longer_than_the_buffer_drops_the_oldest_and_says_so() {
    let cluster = own_cluster();
    let url = fresh_database_on(&cluster.url()).await;
    let job = create_job(&url).await;
    // The command waits for a file, so it floods only while the database is down.
    let gate = std::env::temp_dir().join(format!("eventgate-gate-{job}"));
    let script = format!(
        "echo ready; while [ ! -e '{gate}' ]; do sleep 0.05; done; seq 1 200000; echo last",
        gate = gate.display()
    );
    let worker = worker(
        &url,
        job,
        &["--buffer-bytes", "65536"],
        &["sh", "-c", &script],
    )
    .spawn()
    .unwrap();

    wait_for_line(&url, job, "ready").await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().expect("stop");
        cluster
    })
    .await
    .unwrap();
    std::fs::write(&gate, b"go").unwrap();
    // The worker sees the outage on its next insert; the flood then overflows the
    // buffer. Give it the whole flood before the database comes back.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.resume().expect("resume");
        cluster
    })
    .await
    .unwrap();
    let out = worker.wait_with_output().await.unwrap();
    std::fs::remove_file(&gate).unwrap();

    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = events(&url, job).await;
    let dropped: Vec<_> = events
        .iter()
        .filter(|e| !e.payload["dropped"].is_null())
        .collect();
    assert!(!dropped.is_empty(), "a dropped-output event was written");
    let dropped_lines: u64 = dropped
        .iter()
        .map(|e| e.payload["dropped"]["lines"].as_u64().unwrap())
        .sum();
    // What is stored plus what is reported dropped is everything, still in order.
    let stored = lines(&events, "stdout");
    assert_eq!(stored.len() as u64 + dropped_lines, 200_000 + 2);
    let numbers: Vec<u64> = stored.iter().filter_map(|l| l.parse().ok()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(stored.last().map(String::as_str), Some("last"));
    assert_eq!(final_status(&events)["droppedLines"], dropped_lines);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_gone_for_good_still_lets_the_worker_exit_with_the_code() {
    let cluster = own_cluster();
    let url = fresh_database_on(&cluster.url()).await;
    let job = create_job(&url).await;
    let gate = std::env::temp_dir().join(format!("eventgate-gate-{job}"));
    let script = format!(
        "echo ready; while [ ! -e '{gate}' ]; do sleep 0.05; done; echo lost; exit 5",
        gate = gate.display()
    );
    let worker = worker(
        &url,
        job,
        &["--drain-timeout", "1s"],
        &["sh", "-c", &script],
    )
    .spawn()
    .unwrap();

    wait_for_line(&url, job, "ready").await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().expect("stop");
        cluster
    })
    .await
    .unwrap();
    std::fs::write(&gate, b"go").unwrap();
    let out = worker.wait_with_output().await.unwrap();
    std::fs::remove_file(&gate).unwrap();

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains("were not stored"),
        "the loss is reported: {stderr}"
    );
    assert!(stderr.contains("could not record the status"), "{stderr}");
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unfinished_line_is_shown_early_and_joins_up() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    let script = "printf 'Downloading the big thing'; sleep 1; echo ' done'";
    let code = run_sh(&url, job, &["--partial-line-after", "100ms"], script).await;

    assert_eq!(code, 0);
    let events = events(&url, job).await;
    assert_eq!(
        lines(&events, "stdout"),
        vec!["Downloading the big thing done"]
    );
    let early = events
        .iter()
        .find(|e| e.message.ends_with(SPLIT_MARKER))
        .expect("a piece was stored before the line ended");
    assert_eq!(early.message, format!("Downloading the {SPLIT_MARKER}"));
}

/// Whether `program --version` runs here.
fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_is_redacted_in_every_form_real_tools_print_it() {
    let url = fresh_database().await;
    let job = create_job(&url).await;
    let secret = "s3cr3t value/with+chars";
    // encodeURI / encodeURIComponent from Node.js when it is here, else the same
    // reserved sets from Python.
    let js = if have("node") {
        r#"node -e 'const t = process.env.DEPLOY_TOKEN;
            console.log("encodeURI " + encodeURI(t));
            console.log("encodeURIComponent " + encodeURIComponent(t));
            console.log("stringify " + JSON.stringify({t}))'"#
    } else {
        r#"python3 -c 'import os, json, urllib.parse as u; t = os.environ["DEPLOY_TOKEN"]
print("encodeURI " + u.quote(t, safe=";,/?:@&=+$-_.!~*()#"))
print("encodeURIComponent " + u.quote(t, safe="-_.!~*()"))
print("stringify " + json.dumps({"t": t}))'"#
    };
    let script = format!(
        r#"
        python3 -c 'import os, json, base64, urllib.parse as u; t = os.environ["DEPLOY_TOKEN"]
print("quote " + u.quote(t))
print("quote_plus " + u.quote_plus(t))
print("quote_lower " + u.quote(t, safe="").lower())
print("json " + json.dumps({{"t": t, "k": "\u00e9"}}))
print("hex " + t.encode().hex())
print("HEX " + t.encode().hex().upper())
print("b64url " + base64.urlsafe_b64encode(b"ab" + t.encode()).decode().rstrip("="))'
        {js}
        printf '%s' "$DEPLOY_TOKEN" | base64 -w 0 | tr -d '='; echo
        for lead in 50 51 52 53 54 55 56 57; do
            {{ head -c $lead /dev/zero | tr '\0' x; printf '%s' "$DEPLOY_TOKEN";
               head -c 60 /dev/zero | tr '\0' y; }} | base64
        done
        echo "grep: $DEPLOY_TOKEN here" | grep --color=always 'value'
        echo "grep: $DEPLOY_TOKEN here" | grep --color=always -E 'cr3t|with'
        echo "done"
    "#
    );
    let code = worker(&url, job, &[], &["sh", "-c", &script])
        .env("DEPLOY_TOKEN", secret)
        .status()
        .await
        .unwrap()
        .code();

    assert_eq!(code, Some(0));
    let stored = everything_stored(&url, job).await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let forbidden = [
        secret.to_string(),
        percent_encoded(secret, "-._~/"),                   // quote
        percent_encoded(secret, "-._~ ").replace(' ', "+"), // quote_plus
        percent_encoded(secret, "-._~").to_lowercase(),     // lower-case hex
        percent_encoded(secret, ";,/?:@&=+$-_.!~*'()#"),    // encodeURI
        percent_encoded(secret, "-_.!~*'()"),               // encodeURIComponent
        secret.replace('/', "\\/"),                         // JSON with \/
        "733363723374".to_string(),                         // hex
        "733363723374".to_uppercase(),
        b64.encode(secret).trim_end_matches('=').to_string(),
        "cr3t".to_string(), // inside colour codes
    ];
    for form in &forbidden {
        assert!(!stored.contains(form.as_str()), "{form} leaked:\n{stored}");
    }
    let events = events(&url, job).await;
    let out = lines(&events, "stdout");
    for prefix in [
        "quote ",
        "quote_plus ",
        "quote_lower ",
        "hex ",
        "HEX ",
        "b64url ",
        "encodeURI ",
        "encodeURIComponent ",
    ] {
        assert!(
            out.iter()
                .any(|l| l.starts_with(prefix) && l.contains(REDACTED)),
            "{prefix}: {out:?}"
        );
    }
    assert!(
        out.iter()
            .any(|l| l.starts_with("json ") && l.contains("\\u00e9")),
        "the rest of a JSON line stays: {out:?}"
    );
    assert!(out
        .iter()
        .any(|l| l.starts_with("grep: ") && l.ends_with(" here")));
    assert_eq!(out.last().map(String::as_str), Some("done"));
    // No stored line, and no pair of lines joined as a decoder would, decodes to the
    // secret or to a long part of it.
    let pieces: Vec<String> = out
        .iter()
        .cloned()
        .chain(out.windows(2).map(|pair| pair.concat()))
        .collect();
    for piece in &pieces {
        let decoded = base64_decodings(piece);
        for part in ["s3cr3t", "cr3t val", "value/", "with+chars"] {
            assert!(
                !decoded.contains(part),
                "{piece:?} decodes to {part:?}: {decoded:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_mask_hides_a_value_from_then_on() {
    let url = fresh_database().await;
    let job = create_job(&url).await;

    // The value is made at run time, so the worker cannot know it beforehand.
    let script = r#"
        v="run-time-$(echo 42 | tr 4 7)-value"
        echo "::add-mask::$v"
        sleep 0.2
        echo "later $v"
        echo "on stderr $v" >&2
        printf '%s' "$v" | base64
        echo "encoded run-time-72-value" | sed 's/-/%2D/g'
    "#;
    let code = run_sh(&url, job, &[], script).await;

    assert_eq!(code, 0);
    let stored = everything_stored(&url, job).await;
    for form in [
        "run-time-72-value",
        "run%2Dtime%2D72%2Dvalue",
        "cnVuLXRpbWUtNzItdmFsdWU",
    ] {
        assert!(!stored.contains(form), "{form} leaked:\n{stored}");
    }
    let events = events(&url, job).await;
    let out = lines(&events, "stdout");
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(out[0], format!("::add-mask::{REDACTED}"));
    assert_eq!(out[1], format!("later {REDACTED}"));
    // What is left of the base64 is its last, partly padded group.
    assert!(out[2].starts_with(REDACTED) && out[2].len() < REDACTED.len() + 4);
    assert_eq!(out[3], format!("encoded {REDACTED}"));
    assert_eq!(
        lines(&events, "stderr"),
        vec![format!("on stderr {REDACTED}")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn past_max_log_bytes_one_notice_and_the_command_runs_to_its_end() {
    let url = fresh_database().await;
    let job = create_job(&url).await;
    let dir = std::env::temp_dir().join(format!("eventgate-max-log-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let finished = dir.join("finished");

    let script = format!(
        "seq 1 200000; seq 1 50000 >&2; echo 'after the limit'; touch {}; exit 3",
        finished.display()
    );
    let code = run_sh(&url, job, &["--max-log-bytes", "20000"], &script).await;

    assert_eq!(code, 3, "the command's code is passed on");
    assert!(finished.exists(), "the command ran to its end");
    let events = events(&url, job).await;
    let notices: Vec<&Stored> = events.iter().filter(|e| e.kind() == "notice").collect();
    assert_eq!(notices.len(), 1, "one notice: {notices:?}");
    let notice = notices[0];
    assert_eq!(notice.level, "warn");
    assert_eq!(notice.payload["notice"], "truncated");
    assert_eq!(notice.payload["maxLogBytes"], 20000);
    assert!(notice.message.contains("20000"), "{}", notice.message);
    let logs: Vec<&Stored> = events.iter().filter(|e| e.kind() == "log").collect();
    assert!(
        logs.iter().all(|e| e.seq < notice.seq),
        "nothing is stored after the notice"
    );
    let stored_bytes: usize = logs.iter().map(|e| e.message.len() + 1).sum();
    assert!(stored_bytes <= 20000, "{stored_bytes} bytes stored");
    let out = lines(&events, "stdout");
    assert!(out.len() > 1000, "output up to the limit is kept");
    let expected: Vec<String> = (1..=out.len()).map(|i| i.to_string()).collect();
    assert_eq!(out, expected, "a prefix, whole lines, in order");
    assert!(!out.iter().any(|l| l == "after the limit"));
    let status = final_status(&events);
    assert_eq!(status["status"], "failed");
    assert_eq!(status["exitCode"], 3);
    assert_eq!(status["truncated"]["maxLogBytes"], 20000);
    assert!(status["truncated"]["bytes"].as_u64().unwrap() > 1_000_000);
    std::fs::remove_dir_all(&dir).unwrap();
}
