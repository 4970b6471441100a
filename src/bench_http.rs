//! The end-to-end rows of `nura bench`: commands over HTTP through a child `nura serve`, the time
//! until each command is visible in the read model, and the server's memory under load.

use crate::bench::{Row, Scratch, unique};
use crate::config::BenchArgs;
use anyhow::Context;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

struct Server {
    child: tokio::process::Child,
    base: String,
    token: String,
}

impl Server {
    async fn start(args: &BenchArgs, scratch: &Scratch) -> anyhow::Result<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let exe = std::env::current_exe()?;
        let child = tokio::process::Command::new(exe)
            .arg("serve")
            .env("DATABASE_URL", &scratch.url)
            .env("NATS_URL", &args.nats_url)
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("JWT_SECRET", &secret)
            .env("NURA_STREAM", unique("BENCH_E2E"))
            .env("NURA_SUBJECT_PREFIX", unique("benche2e"))
            .env("RUST_LOG", "warn")
            // The bench offers thousands of commands/s from one caller and one address: the
            // default rate limits (which protect a shared machine) would measure themselves.
            .env("RATE_LIMIT_PER_PRINCIPAL_PER_SEC", "0")
            .env("RATE_LIMIT_PER_IP_PER_SEC", "0")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start nura serve")?;
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "nura serve did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let token = nura_gateway::issue_token(
            &secret.into(),
            "nura",
            "nura-api",
            "bench",
            "bench",
            &[nura_http::Role::Member],
            Duration::from_secs(3600),
        )?;
        Ok(Server { child, base, token })
    }

    fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

/// Posts one `StartConversation`; returns (conversation id, commit token).
async fn create(client: &reqwest::Client, server: &Server) -> anyhow::Result<(String, String)> {
    let res = client
        .post(format!("{}/v1/conversations", server.base))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"title": "bench"}))
        .send()
        .await?;
    anyhow::ensure!(res.status().as_u16() == 201, "status {}", res.status());
    let body: serde_json::Value = res.json().await?;
    Ok((
        body["conversation_id"]
            .as_str()
            .context("conversation_id")?
            .to_owned(),
        body["commit"].as_str().context("commit")?.to_owned(),
    ))
}

async fn visible(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    commit: &str,
) -> anyhow::Result<()> {
    let res = client
        .get(format!(
            "{}/v1/conversations/{id}?after={commit}",
            server.base
        ))
        .bearer_auth(&server.token)
        .send()
        .await?;
    anyhow::ensure!(res.status().is_success(), "status {}", res.status());
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// What one open-loop phase measured.
struct OpenLoop {
    /// Commands/s answered with 201.
    achieved: f64,
    /// Milliseconds until the command's response.
    command_ms: Vec<f64>,
    /// Milliseconds until the command was visible in the read model.
    visible_ms: Vec<f64>,
    /// Requests that failed or were refused by the server.
    errors: u64,
    /// Commands the bench never sent because [`MAX_IN_FLIGHT`] were already waiting: the server
    /// fell that far behind the offered rate.
    shed: u64,
}

/// The most commands an open-loop phase keeps in flight.
const MAX_IN_FLIGHT: usize = 2048;

/// Offers `rate` commands/s for `duration`.
async fn open_loop(server: &Arc<Server>, rate: u64, duration: Duration) -> OpenLoop {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .expect("client");
    let cmd_lat = Arc::new(Mutex::new(Vec::new()));
    let vis_lat = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut shed = 0;
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    while started.elapsed() < duration {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            shed += 1;
            continue;
        };
        let (client, server) = (client.clone(), server.clone());
        let (cmd_lat, vis_lat, errors, done) = (
            cmd_lat.clone(),
            vis_lat.clone(),
            errors.clone(),
            done.clone(),
        );
        tasks.spawn(async move {
            let _permit = permit;
            let t = Instant::now();
            match create(&client, &server).await {
                Ok((id, commit)) => {
                    cmd_lat.lock().await.push(t.elapsed().as_secs_f64() * 1e3);
                    done.fetch_add(1, Ordering::Relaxed);
                    match visible(&client, &server, &id, &commit).await {
                        Ok(()) => vis_lat.lock().await.push(t.elapsed().as_secs_f64() * 1e3),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let elapsed = started.elapsed();
    while tasks.join_next().await.is_some() {}
    OpenLoop {
        achieved: done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        command_ms: std::mem::take(&mut *cmd_lat.lock().await),
        visible_ms: std::mem::take(&mut *vis_lat.lock().await),
        errors: errors.load(Ordering::Relaxed),
        shed,
    }
}

/// Closed loop at `concurrency` for `duration`: commands/s and errors.
async fn closed_max(server: &Arc<Server>, concurrency: usize, duration: Duration) -> (f64, u64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .expect("client");
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, server, ok, errors) =
            (client.clone(), server.clone(), ok.clone(), errors.clone());
        tasks.spawn(async move {
            while started.elapsed() < duration {
                match create(&client, &server).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (
        ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

/// The end-to-end and memory rows.
pub(crate) async fn e2e_rows(
    args: &BenchArgs,
    rates: Vec<u64>,
    phase: Duration,
    memory_run: Duration,
    scratch: &Scratch,
    raw: &BTreeMap<usize, (f64, f64, f64)>,
    append: &BTreeMap<usize, f64>,
) -> anyhow::Result<Vec<Row>> {
    use crate::bench::{Goal, row};
    let mut rows = Vec::new();
    crate::bench::progress("starting nura serve for the end-to-end rows");
    let server = Arc::new(Server::start(args, scratch).await?);
    let raw_commit_p99 = raw[&1].2;

    for c in [32usize] {
        crate::bench::progress(&format!("HTTP closed loop, concurrency {c}"));
        let (rate, errors) = closed_max(&server, c, phase).await;
        rows.push(row(
            format!("HTTP e2e closed loop c={c}"),
            rate,
            append[&c],
            Goal::AtLeast(0.5),
            "commands/s",
        ));
        rows.push(row(
            format!("HTTP e2e closed loop c={c} errors"),
            errors as f64,
            0.0,
            Goal::None,
            "count",
        ));
    }
    for rate in rates {
        crate::bench::progress(&format!("HTTP offered {rate} commands/s"));
        let OpenLoop {
            achieved,
            command_ms: mut cmd,
            visible_ms: mut vis,
            errors,
            shed,
        } = open_loop(&server, rate, phase).await;
        rows.push(row(
            format!("HTTP e2e offered {rate}/s achieved"),
            achieved,
            rate as f64,
            Goal::None,
            "commands/s",
        ));
        rows.push(row(
            format!("HTTP e2e offered {rate}/s command p50"),
            pct(&mut cmd, 0.5),
            raw[&1].1,
            Goal::None,
            "ms",
        ));
        rows.push(row(
            format!("HTTP e2e offered {rate}/s command p99"),
            pct(&mut cmd, 0.99),
            raw_commit_p99,
            Goal::None,
            "ms",
        ));
        rows.push(row(
            format!("HTTP e2e offered {rate}/s visible p50"),
            pct(&mut vis, 0.5),
            raw[&1].1,
            Goal::None,
            "ms",
        ));
        let goal = if rate == 1000 {
            Goal::AtMost(10.0)
        } else {
            Goal::None
        };
        rows.push(row(
            format!("HTTP e2e offered {rate}/s visible p99"),
            pct(&mut vis, 0.99),
            raw_commit_p99,
            goal,
            "ms",
        ));
        rows.push(row(
            format!("HTTP e2e offered {rate}/s errors"),
            errors as f64,
            0.0,
            Goal::None,
            "count",
        ));
        rows.push(row(
            format!("HTTP e2e offered {rate}/s not sent"),
            shed as f64,
            0.0,
            Goal::None,
            "count",
        ));
    }

    crate::bench::progress(&format!(
        "server memory under 1000 commands/s for {}s",
        memory_run.as_secs()
    ));
    let warmup = memory_run / 6;
    open_loop(&server, 1000, warmup).await;
    let start = server.rss_kib().unwrap_or(0) as f64;
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (server, peak) = (server.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                if let Some(r) = server.rss_kib() {
                    peak.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let _ = open_loop(&server, 1000, memory_run - warmup).await;
    sampler.abort();
    let end = server.rss_kib().unwrap_or(0) as f64;
    rows.push(row(
        "server RSS after sustained load (vs after warm-up)",
        end / 1024.0,
        start / 1024.0,
        Goal::AtMost(1.10),
        "MiB",
    ));
    rows.push(row(
        "server peak RSS under load",
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        start / 1024.0,
        Goal::None,
        "MiB",
    ));
    if let Ok(mut s) = Arc::try_unwrap(server) {
        let _ = s.child.start_kill();
        let _ = s.child.wait().await;
    }
    Ok(rows)
}
