//! `nura bench`: throughput and latency of Nura beside raw floors measured in the same run, on
//! the same Postgres and NATS, reported as ratios (these machines are shared and noisy: only
//! ratios within one run are comparable).
//!
//! It creates a scratch database (dropped afterwards) and its own JetStream streams, and starts
//! `nura serve` as a child process for the end-to-end rows. Loopback only; every phase is bounded
//! in time.

use crate::config::BenchArgs;
use anyhow::Context;
use nura_store::{CommandRecord, EventStore, ExpectedVersion, Metadata, NewEvent, Position};
use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Nura's figure.
    pub nura: f64,
    /// The raw floor it is compared with (same run).
    pub floor: f64,
    /// `nura / floor`.
    pub ratio: f64,
    /// The target ratio, if there is one.
    pub target: Option<f64>,
    /// Whether the target was met (`ratio >= target`, or `<=` for costs such as latency).
    pub met: Option<bool>,
    /// Unit of `nura` and `floor`.
    pub unit: String,
}

#[derive(Clone, Copy)]
pub(crate) enum Goal {
    AtLeast(f64),
    AtMost(f64),
    None,
}

pub(crate) fn row(name: impl Into<String>, nura: f64, floor: f64, goal: Goal, unit: &str) -> Row {
    let ratio = if floor > 0.0 { nura / floor } else { f64::NAN };
    let (target, met) = match goal {
        Goal::AtLeast(t) => (Some(t), Some(ratio >= t)),
        Goal::AtMost(t) => (Some(t), Some(ratio <= t)),
        Goal::None => (None, None),
    };
    Row {
        name: name.into(),
        nura,
        floor,
        ratio,
        target,
        met,
        unit: unit.into(),
    }
}

/// Outcome of a closed-loop run.
#[derive(Debug, Default)]
struct Stats {
    ops: u64,
    errors: u64,
    conflicts: u64,
    elapsed: Duration,
    latencies: Vec<f64>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn pct(&mut self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        self.latencies.sort_by(|a, b| a.total_cmp(b));
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }
}

enum Outcome {
    Ok,
    Conflict,
}

/// Runs `op` from `concurrency` workers for `duration`; latencies in milliseconds.
async fn closed_loop<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Outcome>> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (op, stop) = (op.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut s = Stats::default();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match op(w, i).await {
                    Ok(Outcome::Ok) => {
                        s.ops += 1;
                        s.latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(Outcome::Conflict) => s.conflicts += 1,
                    Err(e) => {
                        if s.errors == 0 {
                            tracing::warn!(error = format!("{e:#}"), "bench operation failed");
                        }
                        s.errors += 1;
                    }
                }
                i += 1;
            }
            s
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Stats::default();
    for w in workers {
        if let Ok(s) = w.await {
            total.ops += s.ops;
            total.errors += s.errors;
            total.conflicts += s.conflicts;
            total.latencies.extend(s.latencies);
        }
    }
    total.elapsed = started.elapsed();
    total
}

struct Sizes {
    phase: Duration,
    backlog: usize,
    e2e_rates: Vec<u64>,
    memory_run: Duration,
}

/// Runs the benchmark and prints the table (and writes JSON with `--json`).
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let sizes = if args.quick {
        Sizes {
            phase: Duration::from_secs(3),
            backlog: 20_000,
            e2e_rates: vec![200, 1000],
            memory_run: Duration::from_secs(12),
        }
    } else {
        Sizes {
            phase: Duration::from_secs(10),
            backlog: 100_000,
            e2e_rates: vec![200, 1000, 2000],
            memory_run: Duration::from_secs(60),
        }
    };
    // Interrupted (Ctrl-C, or SIGTERM from `timeout`), the run is abandoned but its scratch
    // database is still dropped; left behind, each such database holds a 100k-event backlog.
    // The handlers are in place before the database exists.
    let interrupted = crate::shutdown_on_signal();
    let scratch = Scratch::create(&args.database_url).await?;
    let result = tokio::select! {
        result = run_all(&args, &sizes, &scratch) => result,
        _ = interrupted.cancelled() => Err(anyhow::anyhow!("interrupted; no rows recorded")),
    };
    scratch.drop_db().await;
    let rows = result?;
    print_table(&rows);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&rows)?)
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

pub(crate) fn progress(what: &str) {
    eprintln!("bench: {what} …");
}

async fn run_all(args: &BenchArgs, sizes: &Sizes, scratch: &Scratch) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let pool = crate::pool_options(66)
        .connect_with(crate::pg_options(&scratch.url)?)
        .await?;
    let store = EventStore::connect_with_group_commit(
        pool.clone(),
        args.group_commit_lanes,
        args.group_commit_max_batch,
    )
    .await?;
    let plain_store = EventStore::connect(pool.clone()).await?;
    let nats = async_nats::connect(&args.nats_url)
        .await
        .context("connect to NATS")?;
    let js = async_nats::jetstream::new(nats.clone());

    // 1. Raw floors, on a pool of their own, configured as Nura's (no health-check round trip
    // before each statement): the plainest way to commit a row.
    sqlx::query("CREATE TABLE bench_raw (LIKE es.events INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let raw_pool = crate::pool_options(64)
        .connect_with(crate::pg_options(&scratch.url)?)
        .await?;
    let mut raw = std::collections::BTreeMap::new();
    for c in [1usize, 8, 32, 64] {
        progress(&format!("raw single-row INSERT, concurrency {c}"));
        let p = raw_pool.clone();
        let mut s = closed_loop(c, sizes.phase, move |_, _| {
            let p = p.clone();
            async move {
                sqlx::query(
                    "INSERT INTO bench_raw (event_id, stream_id, stream_version, partition, event_type, payload, metadata) \
                     VALUES ($1, $2, 1, 0, 'Raw', '{\"n\":1}', '{\"tenant_id\":\"bench\"}')",
                )
                .bind(Uuid::now_v7())
                .bind(Uuid::now_v7().to_string())
                .execute(&p)
                .await?;
                Ok(Outcome::Ok)
            }
        })
        .await;
        let (rate, p50, p99) = (s.rate(), s.pct(0.5), s.pct(0.99));
        rows.push(row(
            format!("floor: raw insert c={c}"),
            rate,
            rate,
            Goal::None,
            "rows/s",
        ));
        raw.insert(c, (rate, p50, p99));
    }
    progress("raw 100-row INSERT");
    {
        let p = raw_pool.clone();
        let s = closed_loop(1, sizes.phase, move |_, _| {
            let p = p.clone();
            async move {
                let ids: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
                let streams: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                sqlx::query(
                    "INSERT INTO bench_raw (event_id, stream_id, stream_version, partition, event_type, payload, metadata) \
                     SELECT i, s, 1, 0, 'Raw', '{\"n\":1}', '{\"tenant_id\":\"bench\"}' FROM unnest($1::uuid[], $2::text[]) AS t(i, s)",
                )
                .bind(&ids)
                .bind(&streams)
                .execute(&p)
                .await?;
                Ok(Outcome::Ok)
            }
        })
        .await;
        rows.push(row(
            "floor: raw 100-row insert",
            s.rate() * 100.0,
            s.rate() * 100.0,
            Goal::None,
            "rows/s",
        ));
    }
    // The append phase opens up to 66 connections of its own (Postgres allows 100 by default).
    raw_pool.close().await;
    progress("raw JetStream publish (windowed acks)");
    let (js_publish, raw_stream) = raw_js_publish(&js, sizes.backlog).await?;
    rows.push(row(
        "floor: JetStream publish, window 512",
        js_publish,
        js_publish,
        Goal::None,
        "msgs/s",
    ));
    progress("raw JetStream pull-consume with ack");
    let js_consume = raw_js_consume(&js, &raw_stream, sizes.backlog).await?;
    rows.push(row(
        "floor: JetStream pull-consume + ack",
        js_consume,
        js_consume,
        Goal::None,
        "msgs/s",
    ));
    progress("raw JetStream pull-consume, 8 partition-filtered consumers");
    let js_partitioned = raw_js_consume_partitioned(&js, sizes.backlog).await?;
    rows.push(row(
        "floor: JetStream pull-consume, 8 filtered consumers",
        js_partitioned,
        js_partitioned,
        Goal::None,
        "msgs/s",
    ));

    let mut append = std::collections::BTreeMap::new();
    if args.runs("append") {
        rows.extend(append_rows(sizes, &store, &plain_store, &raw, &mut append).await);
    }

    // Later phases open connections of their own (Postgres allows 100 by default): give ours back.
    drop((store, plain_store));
    pool.close().await;

    // 5. Read-all, relay and projectors from a backlog.
    if args.runs("backlog") {
        progress(&format!("filling a backlog of {} events", sizes.backlog));
        let backlog_db = Scratch::create(&args.database_url).await?;
        let outcome = backlog_rows(args, sizes, &backlog_db, &js, js_publish, js_consume).await;
        backlog_db.drop_db().await;
        rows.extend(outcome?);
    }

    // 4 and 6. End to end over HTTP through a `nura serve` on a database of its own (the events
    // above would otherwise be a backlog in front of its relay and projectors), and its memory.
    if !args.runs("http") {
        return Ok(rows);
    }
    let e2e_db = Scratch::create(&args.database_url).await?;
    let outcome = crate::bench_http::e2e_rows(
        args,
        sizes.e2e_rates.clone(),
        sizes.phase,
        sizes.memory_run,
        &e2e_db,
        &raw,
        &append,
    )
    .await;
    e2e_db.drop_db().await;
    rows.extend(outcome?);
    Ok(rows)
}

/// 2 and 3. Appends through the event store (with group commit, as `nura serve` runs it; and at
/// concurrency 1 also without, to show what the batching costs when there is nothing to share),
/// then the hot stream. Fills `append` with the rate per concurrency.
async fn append_rows(
    sizes: &Sizes,
    store: &EventStore,
    plain_store: &EventStore,
    raw: &std::collections::BTreeMap<usize, (f64, f64, f64)>,
    append: &mut std::collections::BTreeMap<usize, f64>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    progress("append without group commit, concurrency 1");
    {
        let st = plain_store.clone();
        let s = closed_loop(1, sizes.phase, move |_, _| {
            let st = st.clone();
            async move {
                let cmd = CommandRecord {
                    command_id: Uuid::now_v7().to_string(),
                    request_hash: vec![1; 32],
                };
                st.append(
                    &format!("bench-{}", Uuid::now_v7()),
                    ExpectedVersion::Exact(0),
                    &[bench_event()],
                    &bench_meta(&cmd.command_id),
                    Some(&cmd),
                )
                .await?;
                Ok(Outcome::Ok)
            }
        })
        .await;
        rows.push(row(
            "append c=1 (group commit off)",
            s.rate(),
            raw[&1].0,
            Goal::AtLeast(0.9),
            "commands/s",
        ));
    }
    for c in [1usize, 8, 32, 64] {
        progress(&format!("append through the event store, concurrency {c}"));
        let st = store.clone();
        let mut s = closed_loop(c, sizes.phase, move |_, _| {
            let st = st.clone();
            async move {
                let stream = format!("bench-{}", Uuid::now_v7());
                let cmd = CommandRecord {
                    command_id: Uuid::now_v7().to_string(),
                    request_hash: vec![1; 32],
                };
                st.append(
                    &stream,
                    ExpectedVersion::Exact(0),
                    &[bench_event()],
                    &bench_meta(&cmd.command_id),
                    Some(&cmd),
                )
                .await?;
                Ok(Outcome::Ok)
            }
        })
        .await;
        let (raw_rate, raw_p50, raw_p99) = raw[&c];
        let goal = match c {
            1 => Goal::AtLeast(0.9),
            c if c >= 32 => Goal::AtLeast(3.0),
            _ => Goal::None,
        };
        let (rate, p50, p99) = (s.rate(), s.pct(0.5), s.pct(0.99));
        append.insert(c, rate);
        rows.push(row(
            format!("append c={c}"),
            rate,
            raw_rate,
            goal,
            "commands/s",
        ));
        rows.push(row(
            format!("append c={c} p50 latency"),
            p50,
            raw_p50,
            Goal::None,
            "ms",
        ));
        rows.push(row(
            format!("append c={c} p99 latency"),
            p99,
            raw_p99,
            Goal::None,
            "ms",
        ));
        if s.errors > 0 {
            rows.push(row(
                format!("append c={c} errors"),
                s.errors as f64,
                0.0,
                Goal::None,
                "count",
            ));
        }
    }

    // 3. Hot stream: 8 writers on one stream, read-then-append.
    progress("hot stream, 8 writers");
    {
        let st = store.clone();
        let hot = format!("bench-hot-{}", Uuid::now_v7());
        let s = closed_loop(8, sizes.phase, move |_, _| {
            let (st, hot) = (st.clone(), hot.clone());
            async move {
                let v = st.stream_version(&hot).await?;
                match st
                    .append(
                        &hot,
                        ExpectedVersion::Exact(v),
                        &[bench_event()],
                        &bench_meta("hot"),
                        None,
                    )
                    .await
                {
                    Ok(_) => Ok(Outcome::Ok),
                    Err(nura_store::StoreError::Conflict { .. }) => Ok(Outcome::Conflict),
                    Err(e) => Err(e.into()),
                }
            }
        })
        .await;
        let attempts = (s.ops + s.conflicts).max(1) as f64;
        rows.push(row(
            "hot stream (8 writers) accepted",
            s.rate(),
            raw[&8].0,
            Goal::None,
            "commands/s",
        ));
        rows.push(row(
            "hot stream conflict rate",
            s.conflicts as f64 / attempts,
            1.0,
            Goal::None,
            "fraction",
        ));
    }

    rows
}

async fn backlog_rows(
    _args: &BenchArgs,
    sizes: &Sizes,
    db: &Scratch,
    js: &async_nats::jetstream::Context,
    js_publish: f64,
    js_consume: f64,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let pool = crate::pool_options(34)
        .connect_with(crate::pg_options(&db.url)?)
        .await?;
    let store = EventStore::connect(pool.clone()).await?;
    // Fill with conversation events so projectors have real work: 1 start + messages per stream.
    fill_conversations(&store, sizes.backlog).await?;

    progress("read-all through the ordered log reader");
    let t = Instant::now();
    let mut cursor = Position::ZERO;
    let mut n = 0usize;
    loop {
        let batch = store.read_all(cursor, 1000).await?;
        let Some(last) = batch.last() else { break };
        cursor = last.position();
        n += batch.len();
    }
    let read_all = n as f64 / t.elapsed().as_secs_f64();
    rows.push(row(
        "read-all (ordered log reader)",
        read_all,
        js_consume,
        Goal::None,
        "events/s",
    ));

    progress("relay from a backlog");
    let topology = nura_nats::Topology::named(&unique("BENCH_EV"), &unique("bench"));
    js.delete_stream(&topology.stream).await.ok();
    let stream = topology.ensure_stream(js).await?;
    let shutdown = CancellationToken::new();
    let relay = nura_nats::relay::Relay::new(
        store.clone(),
        js.clone(),
        topology.clone(),
        Default::default(),
    );
    let t = Instant::now();
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut stream = stream;
    loop {
        let info = stream.info().await?;
        if info.state.messages as usize >= n {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the relay did not drain the backlog within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relay_rate = n as f64 / t.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = relay_task.await;
    rows.push(row(
        "relay from backlog",
        relay_rate,
        js_publish,
        Goal::AtLeast(0.8),
        "events/s",
    ));

    progress("projectors from a backlog");
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let proj = tokio::spawn(nura_projections::run(
        store.clone(),
        js.clone(),
        topology.clone(),
        Default::default(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(300);
    let target = last_positions(&pool).await?;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM read.checkpoints c JOIN unnest($1::int[], $2::bigint[], $3::bigint[]) AS t(p, tx, pos) \
             ON c.partition = t.p WHERE c.projector = 'conversations' AND (c.transaction_id, c.global_position) >= (t.tx, t.pos)",
        )
        .bind(target.iter().map(|t| t.0).collect::<Vec<_>>())
        .bind(target.iter().map(|t| t.1.tx).collect::<Vec<_>>())
        .bind(target.iter().map(|t| t.1.pos).collect::<Vec<_>>())
        .fetch_one(&pool)
        .await?;
        if done as usize >= target.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projectors did not drain the backlog within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let proj_rate = n as f64 / t.elapsed().as_secs_f64();
    shutdown.cancel();
    let _ = proj.await;
    rows.push(row(
        "projectors from backlog",
        proj_rate,
        js_consume,
        Goal::AtLeast(0.5),
        "events/s",
    ));
    js.delete_stream(&topology.stream).await.ok();
    pool.close().await;
    Ok(rows)
}

async fn last_positions(pool: &PgPool) -> anyhow::Result<Vec<(i32, Position)>> {
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (partition) partition, transaction_id::text::bigint, global_position FROM es.events \
         ORDER BY partition, transaction_id DESC, global_position DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(p, tx, pos)| (p, Position { tx, pos }))
        .collect())
}

async fn fill_conversations(store: &EventStore, total: usize) -> anyhow::Result<()> {
    use nura_domain::DomainEvent;
    use nura_domain::conversation::ConversationEvent;
    let per_stream = 10usize;
    let streams = total.div_ceil(per_stream);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (store, next) = (store.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= streams {
                    return Ok::<_, anyhow::Error>(());
                }
                let id = Uuid::now_v7();
                let at = chrono::Utc::now();
                let mut events = vec![ConversationEvent::ConversationStarted {
                    conversation_id: id,
                    tenant_id: "bench".into(),
                    title: "bench".into(),
                    started_by: "bench".into(),
                    at,
                }];
                for _ in 1..per_stream {
                    events.push(ConversationEvent::MessagePosted {
                        message_id: Uuid::now_v7(),
                        author: "bench".into(),
                        text: "hello".into(),
                        at,
                    });
                }
                let new: Vec<NewEvent> = events
                    .iter()
                    .map(|e| NewEvent {
                        event_id: Uuid::now_v7(),
                        event_type: e.event_type().into(),
                        schema_version: 1,
                        payload: e.to_payload(),
                    })
                    .collect();
                store
                    .append(
                        &nura_domain::conversation::stream_id(id),
                        ExpectedVersion::Exact(0),
                        &new,
                        &bench_meta("fill"),
                        None,
                    )
                    .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Publishes `n` messages with a window of 512 PubAcks into a fresh stream; returns the rate and
/// the stream's name (consumed next by [`raw_js_consume`]).
async fn raw_js_publish(
    js: &async_nats::jetstream::Context,
    n: usize,
) -> anyhow::Result<(f64, String)> {
    let name = unique("BENCH_RAW");
    let subject = format!("{}.x", name.to_lowercase());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        ..Default::default()
    })
    .await?;
    let t = Instant::now();
    publish_windowed(js, n, |_| subject.clone()).await?;
    Ok((n as f64 / t.elapsed().as_secs_f64(), name))
}

/// Publishes `n` messages of 600 bytes, message `i` on `subject(i)` with `Nats-Msg-Id` `raw-<i>`,
/// keeping at most 512 PubAcks outstanding.
async fn publish_windowed(
    js: &async_nats::jetstream::Context,
    n: usize,
    subject: impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    let body = bytes::Bytes::from(vec![b'x'; 600]);
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("raw-{i}").as_str());
        window.push_back(js.publish_with_headers(subject(i), h, body.clone()).await?);
        if window.len() >= 512 {
            window.pop_front().expect("non-empty").await?;
        }
    }
    for f in window {
        f.await?;
    }
    Ok(())
}

/// Pulls the stream in batches of 256 and acks every message one by one.
async fn raw_js_consume(
    js: &async_nats::jetstream::Context,
    name: &str,
    n: usize,
) -> anyhow::Result<f64> {
    let stream = js.get_stream(name).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let t = Instant::now();
    let got = drain(&consumer, n).await?;
    let rate = got as f64 / t.elapsed().as_secs_f64();
    js.delete_stream(name).await.ok();
    Ok(rate)
}

/// Pulls up to `n` messages from `consumer` in batches of 256 (for at most 120 s) and acks them:
/// each one, or with `AckPolicy::All` the last of each batch, which acks the batch. Returns how
/// many arrived.
async fn drain(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
    n: usize,
) -> anyhow::Result<usize> {
    use futures::StreamExt;
    let cumulative =
        consumer.cached_info().config.ack_policy == async_nats::jetstream::consumer::AckPolicy::All;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut got = 0usize;
    while got < n && Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let mut last = None;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            got += 1;
            if cumulative {
                last = Some(m);
            } else {
                m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        if let Some(m) = last {
            m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    Ok(got)
}

/// The projectors' delivery pattern without Postgres: `n` messages spread over 8 partitions'
/// subjects (shaped as the relay's), drained by 8 concurrent consumers, each filtered on its
/// partition with the projectors' wildcard filter and acking each batch cumulatively. Not a
/// target's floor (those compare with the plain consumer above): it shows what the server's
/// filtered delivery alone allows.
async fn raw_js_consume_partitioned(
    js: &async_nats::jetstream::Context,
    n: usize,
) -> anyhow::Result<f64> {
    use async_nats::jetstream::consumer;
    const PARTITIONS: usize = 8;
    let name = unique("BENCH_RAWP");
    let prefix = name.to_lowercase();
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await?;
    publish_windowed(js, n, |i| {
        format!(
            "{prefix}.conversations.conversation.{}.MessagePosted",
            i % PARTITIONS
        )
    })
    .await?;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PARTITIONS {
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("raw_p{p}")),
                filter_subject: format!("{prefix}.*.*.{p}.*"),
                ack_policy: consumer::AckPolicy::All,
                ..Default::default()
            })
            .await?;
        let expected = n / PARTITIONS + usize::from(p < n % PARTITIONS);
        tasks.push(tokio::spawn(
            async move { drain(&consumer, expected).await },
        ));
    }
    let mut got = 0;
    for task in tasks {
        got += task.await??;
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    js.delete_stream(&name).await.ok();
    Ok(rate)
}

pub(crate) fn bench_event() -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "BenchEvent".into(),
        schema_version: 1,
        payload: serde_json::json!({"n": 1}),
    }
}

pub(crate) fn bench_meta(command_id: &str) -> Metadata {
    Metadata {
        tenant_id: "bench".into(),
        actor: "bench".into(),
        command_id: command_id.into(),
        correlation_id: command_id.into(),
        causation_id: None,
    }
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..10])
}

/// A scratch database on the server of `DATABASE_URL`, migrated, dropped at the end.
pub(crate) struct Scratch {
    pub(crate) url: String,
    admin: sqlx::postgres::PgConnectOptions,
    name: String,
}

impl Scratch {
    async fn create(admin_url: &str) -> anyhow::Result<Scratch> {
        let admin = sqlx::postgres::PgConnectOptions::from_str(admin_url)?;
        let name = unique("nura_bench").to_lowercase();
        let mut c = admin
            .connect()
            .await
            .context("connect to Postgres (DATABASE_URL)")?;
        c.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .context("create scratch database")?;
        c.close().await.ok();
        let url = format!(
            "{}/{name}",
            admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b)
        );
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&url)
            .await?;
        nura_store::MIGRATOR.run(&pool).await?;
        pool.close().await;
        Ok(Scratch { url, admin, name })
    }

    async fn drop_db(&self) {
        if let Ok(mut c) = self.admin.connect().await {
            let _ = c
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )))
                .await;
        }
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<44} {:>14} {:>14} {:>8} {:>8} {:>5}  unit",
        "name", "nura", "floor", "ratio", "target", "met"
    );
    for r in rows {
        let target = r.target.map_or("-".to_string(), |t| format!("{t:.2}"));
        let met = r.met.map_or("-", |m| if m { "yes" } else { "NO" });
        println!(
            "{:<44} {:>14.1} {:>14.1} {:>8.2} {:>8} {:>5}  {}",
            r.name, r.nura, r.floor, r.ratio, target, met, r.unit
        );
    }
}
