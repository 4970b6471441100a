//! The relay: copies the Postgres log into JetStream in commit order (DESIGN.md invariants 1
//! and 4).
//!
//! One relay per cursor name is active: the leader holds `pg_try_advisory_lock(key(name))` on a
//! dedicated connection, and writes its cursor through that same connection, so a relay that
//! lost its lock can never move the cursor. Stand-bys retry every second.
//!
//! The leader reads batches with [`EventStore::read_all_raw`] (commit order, never past the
//! oldest open transaction; payloads stay JSON text, written into the message body unparsed),
//! publishes them with `Nats-Msg-Id = event_id` and a window of outstanding PubAcks, and stores
//! the `(transaction_id, global_position)` of a batch's last event only after every ack up to it
//! arrived. Draining a backlog is pipelined: the next batch is read and encoded while the
//! current one's acks are in flight, one window spans batches, and cursor writes are coalesced.
//! After a failure the newest wholly acked batch is stored and publishing resumes after it, with
//! a back-off; JetStream's de-duplication window absorbs what was already stored, and consumers
//! skip the rest.
//!
//! JetStream is not trusted to keep what it acked: a deleted stream is recreated and refilled
//! from Postgres, and [`Relay::reconcile`] republishes messages the stream lost. A lost
//! message whose id is still inside the de-duplication window would be dropped as a duplicate,
//! so such a repair is sent once more without `Nats-Msg-Id`: identify messages by
//! `Nura-Event-Id`, which every message carries.
//!
//! Limits: the de-duplication window is two minutes, so a relay that republishes older events
//! (after a rewind) produces duplicates in the stream; consumers skip them by position.

use crate::{Topology, encode, encode_raw, headers};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use nura_store::{EventStore, Position, RawEvent, RecordedEvent};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool};
use sqlx::{ConnectOptions, Connection, Row};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often a stand-by tries to take the lock, and how often the leader checks it still has it.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(1);
/// Bound on any single Postgres round trip made for leadership (a dead peer must not hang us).
const LOCK_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the oldest-open-transaction gauge is refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);
/// How long the leader keeps reading ahead in one publishing step before it checks its lock,
/// the gauge and reconciliation again.
const PUMP_TIME: Duration = Duration::from_secs(1);
/// Batches the reader may have ready before the publisher takes them (one more is being read).
const READ_AHEAD: usize = 2;
/// Shortest time between two cursor writes while a backlog drains: a relay that dies republishes
/// at most this much (JetStream's de-duplication and consumers absorb it), and publishing does
/// not wait for a Postgres commit after every batch.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_millis(200);
/// Back-off bounds after a failed batch.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settings of one relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The cursor row in `es.cursors`, and the source of the advisory-lock key: relays with the
    /// same name elect one leader; different names run independently.
    pub name: String,
    /// Events read from Postgres per batch.
    pub batch_size: i64,
    /// PubAcks awaited at most at once while a batch is published.
    pub max_in_flight: usize,
    /// Fallback poll when no `nura_events` notification arrives (notifications are only hints).
    pub poll_interval: Duration,
    /// How often the stream is compared with Postgres and repaired.
    pub reconcile_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            name: "relay".into(),
            batch_size: 1000,
            max_in_flight: 512,
            poll_interval: Duration::from_millis(500),
            reconcile_interval: Duration::from_secs(10),
        }
    }
}

/// What one [`Relay::reconcile`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Messages in the stream when reconciliation started.
    pub stream_messages: u64,
    /// Events in Postgres at or before the relay's cursor.
    pub stored_events: i64,
    /// Events at or before the cursor whose id was not found in the stream (only counted when
    /// the stream was scanned, i.e. when it held fewer messages than Postgres has events).
    pub missing: usize,
    /// Events republished to repair the stream.
    pub republished: usize,
    /// The stream was gone (or recreated, empty) so the cursor went back to [`Position::ZERO`]
    /// and the normal publishing path refills it.
    pub rewound: bool,
}

/// The relay from the Postgres log to JetStream. Build with [`Relay::new`], then either
/// [`Relay::run`] it or drive it step by step with [`Relay::publish_batch`] and
/// [`Relay::reconcile`] (tests).
pub struct Relay {
    store: EventStore,
    js: jetstream::Context,
    topology: Topology,
    config: RelayConfig,
    /// The last position whose event JetStream acked (as stored in `es.cursors`); `None` until
    /// loaded, and reset to `None` whenever leadership changes hands.
    cursor: Option<Position>,
    /// Per partition, the position of the last event at or before `cursor`: the `Nura-Prev`
    /// link of the partition's next event. Only valid together with `cursor`.
    last_in_partition: HashMap<i32, Position>,
    /// Events in Postgres at or before a position the cursor reached, as last counted by
    /// [`Relay::reconcile`]: the next reconciliation counts only the events after it.
    counted: Option<(Position, i64)>,
    /// The dedicated connection holding the advisory lock while this relay leads.
    lock: Option<PgConnection>,
    stream_checked: bool,
}

/// What one publishing step did.
enum Step {
    /// `events` were published and acked (and the cursor stored after them); `caught_up` when
    /// the last read found no full batch, i.e. the visible log is drained.
    Published {
        events: usize,
        caught_up: bool,
    },
    Idle,
    /// The stream was gone: it was recreated and the cursor went back to zero.
    Rewound,
}

impl Relay {
    /// A relay over `store`, publishing on `js` into `topology`'s stream. Does no I/O.
    pub fn new(
        store: EventStore,
        js: jetstream::Context,
        topology: Topology,
        config: RelayConfig,
    ) -> Relay {
        Relay {
            store,
            js,
            topology,
            config,
            cursor: None,
            last_in_partition: HashMap::new(),
            counted: None,
            lock: None,
            stream_checked: false,
        }
    }

    /// The advisory-lock key of a relay name (stable across processes and versions).
    pub fn lock_key(name: &str) -> i64 {
        // FNV-1a 64 over a prefixed name, so other users of advisory locks are unlikely to clash.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in "nura.relay.".bytes().chain(name.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h as i64
    }

    /// Runs until `shutdown` is cancelled: waits for leadership, then tails the log. Losing the
    /// lock (its connection died) stops publishing at once and sends the relay back to stand-by.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        metrics::gauge!("nura_relay_is_leader").set(0.0);
        let mut standby_error_logged = false;
        loop {
            // Stand-by: try the lock every second.
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                match self.try_acquire_leadership().await {
                    Ok(true) => break,
                    Ok(false) => standby_error_logged = false,
                    Err(e) => {
                        if !standby_error_logged {
                            tracing::warn!(relay = %self.config.name, error = %format!("{e:#}"), "relay cannot reach Postgres to take the lock; retrying");
                            standby_error_logged = true;
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(LEADERSHIP_CHECK) => {}
                }
            }
            let outcome = self.lead(&shutdown).await;
            self.release_leadership().await;
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(relay = %self.config.name, error = %format!("{e:#}"), "relay leadership lost; standing by");
                }
            }
        }
    }

    /// Tries once to become the leader for this relay's name; `Ok(true)` when this relay holds
    /// the lock (now or already). Opens a dedicated connection for the lock, never a pooled one,
    /// so the lock lives exactly as long as that connection.
    pub async fn try_acquire_leadership(&mut self) -> anyhow::Result<bool> {
        if self.lock.is_some() {
            if self.check_lock().await.is_ok() {
                return Ok(true);
            }
            self.release_leadership().await;
        }
        // The cursor is derived state, written through this connection after every publishing
        // step: its commits do not wait for a WAL flush, so the next events are not held up
        // behind one. A Postgres crash can take the last moments of cursor moves with it; the
        // relay then republishes those events, and JetStream's de-duplication absorbs them
        // (consumers skip by position what falls outside its window). A rewind, which must
        // never be undone, is flushed (see `rewind`).
        let opts: PgConnectOptions = (*self.store.pool().connect_options())
            .clone()
            .options([("synchronous_commit", "off")])
            .application_name(&format!("nura-relay:{}", self.config.name));
        let mut conn = tokio::time::timeout(LOCK_QUERY_TIMEOUT, opts.connect())
            .await
            .map_err(|_| anyhow::anyhow!("timed out connecting for the relay lock"))??;
        let got: bool = tokio::time::timeout(
            LOCK_QUERY_TIMEOUT,
            sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(Self::lock_key(&self.config.name))
                .fetch_one(&mut conn),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out taking the relay lock"))??;
        if !got {
            let _ = conn.close().await;
            return Ok(false);
        }
        self.lock = Some(conn);
        // Another leader may have moved the cursor meanwhile: reload it and the prev links.
        self.cursor = None;
        self.last_in_partition.clear();
        metrics::gauge!("nura_relay_is_leader").set(1.0);
        tracing::info!(relay = %self.config.name, "relay leadership gained");
        Ok(true)
    }

    /// Whether this relay currently holds its lock connection (it may have died since the last
    /// check; the run loop checks every second).
    pub fn is_leader(&self) -> bool {
        self.lock.is_some()
    }

    /// One step for tests: reads a batch after the cursor, publishes it with a window of acks,
    /// and advances the cursor after all acks. Returns how many events were published (0 when
    /// there was nothing to publish, or when the stream was gone and has just been recreated
    /// with the cursor rewound to zero — the next call republishes from the start).
    pub async fn publish_batch(&mut self) -> anyhow::Result<usize> {
        Ok(match self.step(1, None).await? {
            Step::Published { events, .. } => events,
            Step::Idle | Step::Rewound => 0,
        })
    }

    /// Like [`Relay::publish_batch`] but publishes everything readable after the cursor, the
    /// way the leader drains a backlog: the next batch is read while the current one's acks
    /// are in flight, one window of acks spans batches, and the cursor is stored after fully
    /// acked batches. Returns when a read finds no full batch (so it never returns while
    /// appends keep every read full: for tests and tools, not for a live log).
    pub async fn publish_backlog(&mut self) -> anyhow::Result<usize> {
        Ok(match self.step(usize::MAX, None).await? {
            Step::Published { events, .. } => events,
            Step::Idle | Step::Rewound => 0,
        })
    }

    /// Compares JetStream with Postgres and republishes what the stream lost; returns counts.
    ///
    /// A missing stream is recreated, and a new empty one refilled, through the normal path (the
    /// cursor goes back to zero). A stream with fewer messages than Postgres has events up to
    /// the cursor is scanned (headers only) and exactly the missing events are republished, with
    /// their correct `Nura-Prev` links.
    pub async fn reconcile(&mut self) -> anyhow::Result<ReconcileReport> {
        let cursor = self.load_cursor().await?;
        let mut stream = match self.js.get_stream(&self.topology.stream).await {
            Ok(s) => s,
            Err(e) if is_stream_not_found(&e) => {
                self.recreate_stream_and_rewind().await?;
                return Ok(ReconcileReport {
                    rewound: true,
                    ..Default::default()
                });
            }
            Err(e) => return Err(e.into()),
        };
        let state = stream.info().await?.state.clone();
        let stored = self.stored_until(cursor).await?;
        let mut report = ReconcileReport {
            stream_messages: state.messages,
            stored_events: stored,
            ..Default::default()
        };
        if i64::try_from(state.messages).unwrap_or(i64::MAX) >= stored {
            return Ok(report);
        }
        // A fresh stream (recreated behind our back) has an empty de-duplication window, so the
        // normal path refills it fastest. A purged one may still remember recent ids and drop
        // them as duplicates: it goes through the scan, which republishes around the window.
        if state.messages == 0 && state.last_sequence == 0 {
            tracing::warn!(stream = %self.topology.stream, stored, "stream is new and empty but Postgres has events: republishing everything");
            self.rewind().await?;
            metrics::counter!("nura_relay_reconcile_rewinds_total").increment(1);
            report.rewound = true;
            return Ok(report);
        }
        let in_stream = scan_event_ids(&stream, &state).await?;
        // One pass computes every event's previous link in its partition, so the repair needs
        // no per-event query however much the stream lost.
        let rows = sqlx::query(
            "SELECT event_id, \
                    lag(transaction_id::text::bigint) OVER w, lag(global_position) OVER w \
             FROM es.events \
             WHERE (transaction_id, global_position) <= ($1::bigint::text::xid8, $2) \
             WINDOW w AS (PARTITION BY partition ORDER BY transaction_id, global_position)",
        )
        .bind(cursor.tx)
        .bind(cursor.pos)
        .fetch_all(self.store.pool())
        .await?;
        let mut missing = Vec::new();
        let mut links = HashMap::new();
        for row in rows {
            let id: Uuid = row.try_get(0)?;
            if !in_stream.contains(&id) {
                let tx: Option<i64> = row.try_get(1)?;
                let pos: Option<i64> = row.try_get(2)?;
                missing.push(id);
                links.insert(id, tx.zip(pos).map(|(tx, pos)| Position { tx, pos }));
            }
        }
        report.missing = missing.len();
        if missing.is_empty() {
            return Ok(report);
        }
        tracing::warn!(stream = %self.topology.stream, missing = missing.len(), in_stream = state.messages, stored, "stream lost messages; republishing them from Postgres");
        let mut republished = 0;
        for ids in missing.chunks(usize::try_from(self.config.batch_size.max(1)).unwrap_or(1000)) {
            let events = self.store.events_by_id(ids).await?;
            republished += self.republish(&events, &links).await?;
        }
        metrics::counter!("nura_relay_republished_total").increment(republished as u64);
        tracing::info!(stream = %self.topology.stream, republished, "republished events the stream lost");
        report.republished = republished;
        Ok(report)
    }

    /// Events in Postgres at or before `cursor`. Everything at or before a cursor is committed
    /// and final (the cursor only passes transactions older than every open one), so an earlier
    /// count stays true and only the events after it are counted: a short range of the
    /// commit-order index instead of the whole log at every reconciliation. The whole log is
    /// counted once per leadership term.
    async fn stored_until(&mut self, cursor: Position) -> anyhow::Result<i64> {
        let stored = match self.counted {
            Some((at, n)) if at <= cursor => n + self.store.count_between(at, cursor).await?,
            _ => self.store.count_until(cursor).await?,
        };
        self.counted = Some((cursor, stored));
        Ok(stored)
    }

    /// Leads until shutdown (`Ok`) or until the lock is lost (`Err`).
    async fn lead(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let wake = Arc::new(Notify::new());
        let listener_stop = shutdown.child_token();
        // The listener task ends with this leadership term, however `lead` returns.
        let _stop_listener = listener_stop.clone().drop_guard();
        tokio::spawn(listen_for_appends(
            self.store.pool().clone(),
            wake.clone(),
            listener_stop.clone(),
            self.config.poll_interval,
        ));
        tokio::spawn(forward_local_appends(
            self.store.appended(),
            wake.clone(),
            listener_stop,
        ));
        let mut last_lock_check = Instant::now();
        let mut last_gauge = Instant::now() - GAUGE_REFRESH;
        let mut next_reconcile = Instant::now() + self.config.reconcile_interval;
        let mut failures: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if last_lock_check.elapsed() >= LEADERSHIP_CHECK {
                self.check_lock().await?;
                last_lock_check = Instant::now();
            }
            if last_gauge.elapsed() >= GAUGE_REFRESH {
                if let Ok(s) = self.store.oldest_open_transaction_seconds().await {
                    metrics::gauge!("nura_es_oldest_open_transaction_seconds").set(s);
                }
                last_gauge = Instant::now();
            }
            if failures == 0 && Instant::now() >= next_reconcile {
                match self.reconcile().await {
                    Ok(r) if r.republished > 0 || r.rewound => {
                        tracing::info!(relay = %self.config.name, ?r, "reconciled stream with Postgres");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(relay = %self.config.name, error = %format!("{e:#}"), "reconciliation failed; will retry");
                    }
                }
                next_reconcile = Instant::now() + self.config.reconcile_interval;
            }
            let started = Instant::now();
            // Bounded in time, so the lock check, the gauge and reconciliation still run while
            // a large backlog drains.
            let step = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                s = self.step(usize::MAX, Some(started + PUMP_TIME)) => s,
            };
            match step {
                Ok(s) => {
                    if failures > 0 {
                        tracing::info!(relay = %self.config.name, failed_attempts = failures, "relay publishing again (NATS up)");
                        failures = 0;
                    }
                    match s {
                        Step::Published { caught_up, .. } => {
                            metrics::histogram!("nura_relay_batch_seconds")
                                .record(started.elapsed().as_secs_f64());
                            if !caught_up {
                                continue;
                            }
                        }
                        Step::Rewound => continue,
                        Step::Idle => {}
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = wake.notified() => {}
                    }
                }
                Err(e) => {
                    metrics::counter!("nura_relay_publish_errors_total").increment(1);
                    if failures == 0 {
                        // Once per failure streak, not per message or per attempt.
                        let nats_up = matches!(
                            self.js.client().connection_state(),
                            async_nats::connection::State::Connected
                        );
                        if nats_up {
                            tracing::warn!(relay = %self.config.name, error = %format!("{e:#}"), "relay batch failed; retrying the same batch with back-off");
                        } else {
                            tracing::warn!(relay = %self.config.name, error = %format!("{e:#}"), "NATS down: relay retrying the same batch with back-off");
                        }
                    }
                    failures = failures.saturating_add(1);
                    // The failure may be our lock connection: never retry without the lock.
                    self.check_lock().await?;
                    last_lock_check = Instant::now();
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff(failures)) => {}
                    }
                }
            }
        }
    }

    /// Fails when the lock connection is gone or dead; then leadership is lost.
    async fn check_lock(&mut self) -> anyhow::Result<()> {
        let Some(conn) = self.lock.as_mut() else {
            anyhow::bail!("relay does not hold its lock");
        };
        match tokio::time::timeout(LOCK_QUERY_TIMEOUT, conn.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("relay lock connection died: {e}")),
            Err(_) => Err(anyhow::anyhow!("relay lock connection does not answer")),
        }
    }

    async fn release_leadership(&mut self) {
        if let Some(conn) = self.lock.take() {
            // Closing the session releases the advisory lock; a dead one is released by Postgres.
            let _ = tokio::time::timeout(LOCK_QUERY_TIMEOUT, conn.close()).await;
            metrics::gauge!("nura_relay_is_leader").set(0.0);
            tracing::info!(relay = %self.config.name, "relay leadership released");
        }
        self.cursor = None;
        self.counted = None;
        self.last_in_partition.clear();
    }

    /// Publishes at most `max_batches` batches after the cursor, reading ahead only until
    /// `read_until`, and returns once their acks are in.
    ///
    /// The next batch is read and encoded in a task of its own while the current one is
    /// published, and one window of at most `max_in_flight` PubAcks spans batches. Acks are
    /// awaited in publish order, so once a batch's last ack arrived every event up to it is in
    /// the stream and its last position may become the cursor. Cursor writes are coalesced (at
    /// most one per [`CURSOR_SAVE_INTERVAL`], and one at the end); on a failure the newest fully
    /// acked batch is stored before the error is returned, so the retry resumes right after it
    /// and never past an unacked event.
    async fn step(
        &mut self,
        max_batches: usize,
        read_until: Option<Instant>,
    ) -> anyhow::Result<Step> {
        if !self.stream_checked {
            // A stream that vanished while no relay ran must be refilled from the start, not
            // from the stored cursor.
            match self.js.get_stream(&self.topology.stream).await {
                Ok(_) => self.stream_checked = true,
                Err(e) if is_stream_not_found(&e) => {
                    let cursor = self.load_cursor().await?;
                    if cursor == Position::ZERO {
                        self.topology.ensure_stream(&self.js).await?;
                        self.stream_checked = true;
                    } else {
                        self.recreate_stream_and_rewind().await?;
                        return Ok(Step::Rewound);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        let cursor = self.load_cursor().await?;
        let window_size = self.config.max_in_flight.max(1);
        let mut batches_read = self.read_ahead(cursor, max_batches, read_until);
        let mut window = FuturesOrdered::new();
        let mut acks = Acks::default();
        let mut caught_up = false;
        let mut last_save = Instant::now();
        let mut failure: Option<anyhow::Error> = None;
        'read: while let Some(batch) = batches_read.recv().await {
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    failure = Some(anyhow::Error::new(e).context("reading the log"));
                    break;
                }
            };
            let Some(last) = batch.last else {
                caught_up = true;
                break;
            };
            if (batch.messages.len() as i64) < self.config.batch_size {
                caught_up = true;
            }
            for (subject, h, body) in batch.messages {
                match self.js.publish_with_headers(subject, h, body).await {
                    Ok(ack) => window.push_back(ack.into_future()),
                    Err(e) => {
                        failure = Some(e.into());
                        break 'read;
                    }
                }
                acks.published += 1;
                while window.len() >= window_size {
                    match window.next().await {
                        Some(Ok(_)) => acks.acked(),
                        Some(Err(e)) => {
                            failure = Some(e.into());
                            break 'read;
                        }
                        None => break,
                    }
                    if last_save.elapsed() >= CURSOR_SAVE_INTERVAL && acks.complete.is_some() {
                        if let Err(e) = self.store_acked(&mut acks).await {
                            failure = Some(e);
                            break 'read;
                        }
                        last_save = Instant::now();
                    }
                }
            }
            acks.batch_published(last, batch.links);
        }
        if failure.is_none() {
            while let Some(r) = window.next().await {
                match r {
                    Ok(_) => acks.acked(),
                    Err(e) => {
                        failure = Some(e.into());
                        break;
                    }
                }
            }
        }
        // Whatever happened, what was fully acked is kept.
        let stored = self.store_acked(&mut acks).await;
        if let Some(e) = failure {
            if let Err(se) = stored {
                tracing::warn!(relay = %self.config.name, error = %format!("{se:#}"), "could not store the cursor after a failed batch");
            }
            if e.downcast_ref::<jetstream::context::PublishError>()
                .is_some_and(|pe| pe.kind() == PublishErrorKind::StreamNotFound)
            {
                return self.stream_lost(e).await;
            }
            return Err(e.context(format!(
                "publishing after {} to stream {}",
                self.cursor.unwrap_or(cursor),
                self.topology.stream
            )));
        }
        stored?;
        if acks.stored_events == 0 {
            return Ok(Step::Idle);
        }
        Ok(Step::Published {
            events: acks.stored_events,
            caught_up,
        })
    }

    /// Starts a task that reads and encodes up to `max_batches` batches after `after` (the
    /// cursor, whose partition links are `last_in_partition`), each after the previous one,
    /// staying at most [`READ_AHEAD`] batches ahead of the publisher. It stops after a batch that
    /// is not full (the visible log is drained), after an error, once `read_until` has passed,
    /// or when the receiver is dropped.
    fn read_ahead(
        &self,
        after: Position,
        max_batches: usize,
        read_until: Option<Instant>,
    ) -> tokio::sync::mpsc::Receiver<Result<Batch, nura_store::StoreError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let (store, topology) = (self.store.clone(), self.topology.clone());
        let limit = self.config.batch_size;
        let mut links = self.last_in_partition.clone();
        tokio::spawn(async move {
            let mut after = after;
            for _ in 0..max_batches {
                let batch =
                    read_batch(&store, &topology, after, limit, std::mem::take(&mut links)).await;
                let next = match &batch {
                    Ok(b) if b.messages.len() as i64 >= limit => {
                        b.last.map(|l| (l, b.links.clone()))
                    }
                    _ => None,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
                match next {
                    Some((l, ls)) if read_until.is_none_or(|t| Instant::now() < t) => {
                        after = l;
                        links = ls;
                    }
                    _ => return,
                }
            }
        });
        rx
    }

    /// Stores the newest fully acked batch as the cursor, with its partition links.
    async fn store_acked(&mut self, acks: &mut Acks) -> anyhow::Result<()> {
        let Some((last, links, events)) = acks.complete.take() else {
            return Ok(());
        };
        self.save_cursor(last).await?;
        self.last_in_partition = links;
        let newly = events - acks.stored_events;
        acks.stored_events = events;
        metrics::counter!("nura_relay_published_total").increment(newly as u64);
        Ok(())
    }

    /// A publish found no stream: recreate it and rewind, unless the stream exists and simply
    /// does not capture our subjects (a configuration error that rewinding would not fix).
    async fn stream_lost(&mut self, e: anyhow::Error) -> anyhow::Result<Step> {
        match self.js.get_stream(&self.topology.stream).await {
            Ok(_) => Err(e.context(format!(
                "stream {} exists but does not capture subjects {}.>",
                self.topology.stream, self.topology.subject_prefix
            ))),
            Err(ge) if is_stream_not_found(&ge) => {
                self.recreate_stream_and_rewind().await?;
                Ok(Step::Rewound)
            }
            Err(ge) => Err(ge.into()),
        }
    }

    async fn recreate_stream_and_rewind(&mut self) -> anyhow::Result<()> {
        self.topology.ensure_stream(&self.js).await?;
        self.stream_checked = true;
        tracing::warn!(stream = %self.topology.stream, "stream was gone: recreated it; republishing everything from Postgres");
        metrics::counter!("nura_relay_stream_recreated_total").increment(1);
        self.rewind().await
    }

    /// Moves the cursor back to zero, flushed before it returns: a rewind lost in a crash would
    /// leave the cursor past events the recreated stream does not hold.
    async fn rewind(&mut self) -> anyhow::Result<()> {
        self.set_lock_synchronous_commit("on").await?;
        self.save_cursor(Position::ZERO).await?;
        self.set_lock_synchronous_commit("off").await?;
        self.last_in_partition.clear();
        Ok(())
    }

    async fn load_cursor(&mut self) -> anyhow::Result<Position> {
        if let Some(c) = self.cursor {
            return Ok(c);
        }
        let sql = "SELECT transaction_id, global_position FROM es.cursors WHERE name = $1";
        let row = match self.lock.as_mut() {
            Some(conn) => {
                sqlx::query(sql)
                    .bind(&self.config.name)
                    .fetch_optional(conn)
                    .await?
            }
            None => {
                sqlx::query(sql)
                    .bind(&self.config.name)
                    .fetch_optional(self.store.pool())
                    .await?
            }
        };
        let cursor = row.map_or(Ok(Position::ZERO), |r| {
            Ok::<_, sqlx::Error>(Position {
                tx: r.try_get(0)?,
                pos: r.try_get(1)?,
            })
        })?;
        self.cursor = Some(cursor);
        self.last_in_partition.clear();
        Ok(cursor)
    }

    /// Sets `synchronous_commit` on the lock connection, if there is one (pool connections
    /// keep the server's setting).
    async fn set_lock_synchronous_commit(&mut self, value: &str) -> anyhow::Result<()> {
        if let Some(conn) = self.lock.as_mut() {
            let set = sqlx::query("SELECT set_config('synchronous_commit', $1, false)")
                .bind(value)
                .execute(conn);
            tokio::time::timeout(LOCK_QUERY_TIMEOUT, set)
                .await
                .map_err(|_| anyhow::anyhow!("timed out setting synchronous_commit"))??;
        }
        Ok(())
    }

    /// Stores the cursor; a leader writes through its lock connection, so a relay whose lock
    /// died cannot move the cursor after a new leader took over.
    async fn save_cursor(&mut self, position: Position) -> anyhow::Result<()> {
        let sql = "INSERT INTO es.cursors (name, transaction_id, global_position, updated_at) \
                   VALUES ($1, $2, $3, now()) \
                   ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
                   global_position = EXCLUDED.global_position, updated_at = now()";
        let q = sqlx::query(sql)
            .bind(&self.config.name)
            .bind(position.tx)
            .bind(position.pos);
        match self.lock.as_mut() {
            Some(conn) => {
                tokio::time::timeout(LOCK_QUERY_TIMEOUT, q.execute(conn))
                    .await
                    .map_err(|_| anyhow::anyhow!("timed out storing the relay cursor"))??;
            }
            None => {
                q.execute(self.store.pool()).await?;
            }
        }
        self.cursor = Some(position);
        Ok(())
    }

    /// Republishes events (in commit order) that the stream lost. The ids may still be in the
    /// stream's de-duplication window even though their messages are gone; those are sent again
    /// without `Nats-Msg-Id`, since we know they are missing.
    async fn republish(
        &self,
        events: &[RecordedEvent],
        links: &HashMap<Uuid, Option<Position>>,
    ) -> anyhow::Result<usize> {
        let mut with_links = Vec::with_capacity(events.len());
        for event in events {
            let prev = match links.get(&event.event_id) {
                Some(p) => *p,
                None => {
                    self.store
                        .previous_in_partition(event.partition, event.position())
                        .await?
                }
            };
            with_links.push((event, prev));
        }
        let mut deduplicated = Vec::new();
        let mut in_flight = FuturesOrdered::new();
        for (i, (event, prev)) in with_links.iter().enumerate() {
            let (h, body) = encode(event, *prev);
            let ack = self
                .js
                .publish_with_headers(self.topology.subject(event), h, body)
                .await?;
            in_flight.push_back(async move { (i, ack.await) });
            while in_flight.len() >= self.config.max_in_flight.max(1) {
                if let Some((i, r)) = in_flight.next().await
                    && r?.duplicate
                {
                    deduplicated.push(i);
                }
            }
        }
        while let Some((i, r)) = in_flight.next().await {
            if r?.duplicate {
                deduplicated.push(i);
            }
        }
        deduplicated.sort_unstable();
        for i in deduplicated {
            let (event, prev) = with_links[i];
            let (h, body) = encode(event, prev);
            self.js
                .publish_with_headers(self.topology.subject(event), without_msg_id(&h), body)
                .await?
                .await?;
        }
        Ok(events.len())
    }
}

/// A batch read after some position, encoded and ready to publish.
struct Batch {
    /// `(subject, headers, body)` of each event, in commit order.
    messages: Vec<(String, HeaderMap, Bytes)>,
    /// The position of the last event; `None` when nothing was readable.
    last: Option<Position>,
    /// Each partition's last position once this batch is published: the next batch's links.
    links: HashMap<i32, Position>,
}

/// Reads the batch after `after` with [`EventStore::read_all_raw`], links each event to the
/// previous one of its partition (starting from `links`, else from Postgres) and encodes it.
async fn read_batch(
    store: &EventStore,
    topology: &Topology,
    after: Position,
    limit: i64,
    mut links: HashMap<i32, Position>,
) -> Result<Batch, nura_store::StoreError> {
    let page = store.read_all_raw(after, limit).await?;
    let events = page.events()?;
    let mut messages = Vec::with_capacity(events.len());
    for event in &events {
        let prev = match links.get(&event.partition) {
            Some(p) => Some(*p),
            // Nothing precedes the start of the log.
            None if after == Position::ZERO => None,
            None => {
                store
                    .previous_in_partition(event.partition, event.position())
                    .await?
            }
        };
        links.insert(event.partition, event.position());
        let (h, body) = encode_raw(event, prev);
        messages.push((topology.raw_subject(event), h, body));
    }
    Ok(Batch {
        messages,
        last: events.last().map(RawEvent::position),
        links,
    })
}

/// Ack bookkeeping of one publishing step. Acks are awaited in publish order, so counting them
/// tells which batches are wholly in the stream.
#[derive(Default)]
struct Acks {
    /// Messages published so far.
    published: usize,
    /// Acks received so far (each for the oldest unacknowledged message).
    acked: usize,
    /// Published batches not yet wholly acked, oldest first: last position, partition links
    /// after the batch, and the `published` count at the batch's end.
    open: VecDeque<(Position, HashMap<i32, Position>, usize)>,
    /// The newest wholly acked batch whose position is not stored yet.
    complete: Option<(Position, HashMap<i32, Position>, usize)>,
    /// Events up to the stored cursor.
    stored_events: usize,
}

impl Acks {
    fn batch_published(&mut self, last: Position, links: HashMap<i32, Position>) {
        self.open.push_back((last, links, self.published));
        self.close_acked();
    }

    fn acked(&mut self) {
        self.acked += 1;
        self.close_acked();
    }

    fn close_acked(&mut self) {
        while self.open.front().is_some_and(|b| b.2 <= self.acked) {
            self.complete = self.open.pop_front();
        }
    }
}

/// Wakes the leader on every `nura_events` notification until `stop`. Notifications are hints
/// (any sent while the listener is disconnected are lost), so the leader also polls; this task
/// only shortens the wait. Runs apart from the publishing loop so that no `recv` is ever
/// cancelled halfway, and reconnects after an error.
async fn listen_for_appends(
    pool: PgPool,
    wake: Arc<Notify>,
    stop: CancellationToken,
    retry_after: Duration,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Err(e) = forward_notifications(&pool, &wake) => {
                tracing::debug!(error = %e, "notification listener failed; polling until it reconnects");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retry_after.max(Duration::from_millis(100))) => {}
        }
    }
}

/// Wakes the leader on every append this process's store commits (the relay inside `nura
/// serve`), without waiting for the `NOTIFY` round trip, until `stop`.
async fn forward_local_appends(
    mut appended: tokio::sync::watch::Receiver<u64>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = appended.changed() => match changed {
                Ok(()) => wake.notify_one(),
                Err(_) => return,
            },
        }
    }
}

/// Listens until the connection fails; returns only with that error.
async fn forward_notifications(
    pool: &PgPool,
    wake: &Notify,
) -> Result<std::convert::Infallible, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(nura_store::NOTIFY_CHANNEL).await?;
    // Whatever committed before the listener was up (at start, or during a reconnect) sent its
    // notification to nobody: read once now instead of waiting for the poll.
    wake.notify_one();
    loop {
        l.recv().await?;
        // Many appends mean many notifications: one wake-up serves them all.
        while l.next_buffered().is_some() {}
        wake.notify_one();
    }
}

/// The event ids (`Nura-Event-Id`) of every message in the stream up to `last_sequence`, read
/// with an ordered consumer that fetches headers only.
async fn scan_event_ids(
    stream: &stream::Stream,
    state: &stream::State,
) -> anyhow::Result<HashSet<Uuid>> {
    let mut ids = HashSet::new();
    let last_sequence = state.last_sequence;
    if state.messages == 0 {
        return Ok(ids);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            headers_only: true,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| anyhow::anyhow!("stream scan stalled"))?;
        let Some(msg) = next else { break };
        let msg = msg?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        // The last sequence may be a deleted message: `pending` tells when nothing is left.
        let done = info.stream_sequence >= last_sequence || info.pending == 0;
        if let Some(id) = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::EVENT_ID))
            .and_then(|v| v.as_str().parse::<Uuid>().ok())
        {
            ids.insert(id);
        }
        if done {
            break;
        }
    }
    Ok(ids)
}

fn without_msg_id(h: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, values) in h.iter() {
        if name.as_ref() as &str == headers::MSG_ID {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(js)
            if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Capped exponential back-off with jitter (half fixed, half random) after `failures` failures.
fn backoff(failures: u32) -> Duration {
    use std::hash::BuildHasher;
    let exp = BACKOFF_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(BACKOFF_MAX);
    let half = capped / 2;
    // A fresh RandomState is randomly keyed: enough entropy for jitter without a dependency.
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    let jitter = half.mul_f64((r % 1000) as f64 / 1000.0);
    half + jitter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_differ_by_name_and_are_stable() {
        assert_eq!(Relay::lock_key("relay"), Relay::lock_key("relay"));
        assert_ne!(Relay::lock_key("relay"), Relay::lock_key("relay-2"));
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        assert!(backoff(1) <= BACKOFF_MIN);
        for n in 1..100 {
            assert!(backoff(n) <= BACKOFF_MAX);
        }
        assert!(backoff(20) >= BACKOFF_MAX / 2);
    }
}
