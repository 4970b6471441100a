//! Group commit: concurrent appends share one statement, one transaction and one WAL flush.
//!
//! Appends are routed to a lane by their stream id (a stream always lands in the same lane, so a
//! lane never races itself on a stream). A lane runs one statement at a time. An append that
//! finds its lane idle runs its own statement on the caller's task — under light load group
//! commit costs no task switch. Appends that arrive while the lane is busy wait in its queue;
//! when the running statement ends, a drain task takes whatever is waiting — at most one command
//! per stream and `max_batch` commands — and writes it with one statement that checks every
//! command's expected version and idempotency key on its own: a command whose check fails is
//! left out of the batch and answered individually (conflict, replay or mismatch), so one
//! command's conflict never fails another. If the batch statement itself is refused (a race with
//! another process on a unique key, a deadlock), every command of the batch is retried on its
//! own.
//!
//! Each lane runs its statements, single appends and batches, on a connection of its own that
//! always uses generic plans (custom plans of the batch statement, one per batch, cost as much to
//! plan as to run). Holding one warm connection per lane matters even at concurrency 1: the pool
//! hands out whichever connection idled longest, so after a burst every append would run on a
//! different backend with cold caches, behind a health-check round trip. When that connection
//! cannot be opened (the server is at `max_connections`, or down), statements use the store's
//! pool, and the lane tries again a second later.

use crate::event::{
    Appended, CommandRecord, CommitToken, ExpectedVersion, Metadata, NewEvent, Position,
    partition_of,
};
use crate::postgres::{StoreError, append_on, append_one};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use sqlx::{ConnectOptions, Executor, Postgres};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One command's append, owned so it can wait in a lane.
struct AppendRequest {
    stream_id: String,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
    metadata: Metadata,
    command: Option<CommandRecord>,
}

type Reply = oneshot::Sender<Result<Appended, StoreError>>;

/// The lanes of a store with group commit.
#[derive(Clone, Debug)]
pub(crate) struct GroupCommit {
    lanes: Vec<Arc<Lane>>,
}

#[derive(Debug)]
struct Lane {
    /// For appends run on the caller's task, and for batches when `conn` is missing.
    pool: PgPool,
    /// Options of the lane's own connection (`plan_cache_mode = force_generic_plan`).
    batch_options: PgConnectOptions,
    partitions: i32,
    max_batch: usize,
    state: Mutex<LaneState>,
    /// The lane's own connection, used only by its drain task (one at a time), and when the
    /// last attempt to open it failed.
    conn: Mutex<(Option<PgConnection>, Option<Instant>)>,
}

/// The `application_name` of the lanes' own connections, as `pg_stat_activity` shows them.
pub const LANE_APPLICATION_NAME: &str = "nura-group-commit";

/// How long a lane whose own connection failed to open uses the pool before trying again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct LaneState {
    /// A statement of this lane is running (on a caller's task or on the drain task).
    busy: bool,
    pending: VecDeque<(AppendRequest, Reply)>,
}

impl std::fmt::Debug for LaneState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneState")
            .field("busy", &self.busy)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl GroupCommit {
    /// Sets up `lanes` lanes over `pool`; each lane opens (lazily) one connection of its own
    /// with the pool's connect options.
    pub(crate) fn start(
        pool: PgPool,
        partitions: i32,
        lanes: usize,
        max_batch: usize,
    ) -> GroupCommit {
        let batch_options = (*pool.connect_options())
            .clone()
            .options([("plan_cache_mode", "force_generic_plan")])
            .application_name(LANE_APPLICATION_NAME);
        let lanes = (0..lanes.max(1))
            .map(|_| {
                Arc::new(Lane {
                    pool: pool.clone(),
                    batch_options: batch_options.clone(),
                    partitions,
                    max_batch: max_batch.max(1),
                    state: Mutex::new(LaneState::default()),
                    conn: Mutex::new((None, None)),
                })
            })
            .collect();
        GroupCommit { lanes }
    }

    /// Appends through the stream's lane and returns this command's own outcome.
    pub(crate) async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
        metadata: &Metadata,
        command: Option<&CommandRecord>,
    ) -> Result<Appended, StoreError> {
        let lane = &self.lanes[partition_of(stream_id, self.lanes.len() as i32) as usize];
        let queued = {
            let mut s = lane.state.lock().expect("lane state");
            if s.busy {
                let (tx, rx) = oneshot::channel();
                s.pending.push_back((
                    AppendRequest {
                        stream_id: stream_id.to_owned(),
                        expected,
                        events: events.to_vec(),
                        metadata: metadata.clone(),
                        command: command.cloned(),
                    },
                    tx,
                ));
                Some(rx)
            } else {
                s.busy = true;
                None
            }
        };
        match queued {
            Some(rx) => rx
                .await
                .map_err(|_| StoreError::Corrupt("group commit lane dropped a request".into()))?,
            None => {
                // Released even if the caller gives up mid-statement.
                let _running = Running(lane.clone());
                metrics::histogram!("nura_store_group_commit_size").record(1.0);
                // Dropped, not put back, if the caller gives up mid-statement.
                let mut conn = lane.own_connection().await;
                let appended = lane
                    .single(&mut conn, stream_id, expected, events, metadata, command)
                    .await;
                lane.put_back(conn);
                appended
            }
        }
    }
}

/// Marks a lane busy while a caller runs its own append; on drop, hands what queued up
/// meanwhile to a drain task.
struct Running(Arc<Lane>);

impl Drop for Running {
    fn drop(&mut self) {
        let lane = &self.0;
        let mut s = lane.state.lock().expect("lane state");
        if s.pending.is_empty() {
            s.busy = false;
            return;
        }
        drop(s);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(drain(lane.clone()));
            }
            // No runtime left: the waiting callers' replies are dropped and they see an error.
            Err(_) => {
                let mut s = lane.state.lock().expect("lane state");
                s.pending.clear();
                s.busy = false;
            }
        }
    }
}

/// Runs batches until the lane's queue is empty, then marks the lane idle.
async fn drain(lane: Arc<Lane>) {
    let mut conn = lane.own_connection().await;
    loop {
        let mut batch = {
            let mut s = lane.state.lock().expect("lane state");
            if s.pending.is_empty() {
                s.busy = false;
                break;
            }
            take_batch(&mut s.pending, lane.max_batch)
        };
        metrics::histogram!("nura_store_group_commit_size").record(batch.len() as f64);
        if batch.len() == 1 {
            let (req, reply) = batch.pop().expect("one request");
            let appended = lane
                .single(
                    &mut conn,
                    &req.stream_id,
                    req.expected,
                    &req.events,
                    &req.metadata,
                    req.command.as_ref(),
                )
                .await;
            let _ = reply.send(appended);
            continue;
        }
        match conn.as_mut() {
            Some(c) => {
                if !run_batch(&mut *c, &lane.pool, lane.partitions, batch).await {
                    // The connection may be broken: the next drain opens a new one.
                    conn = None;
                }
            }
            None => {
                run_batch(&lane.pool, &lane.pool, lane.partitions, batch).await;
            }
        }
    }
    lane.put_back(conn);
}

impl Lane {
    /// One command's append, on the lane's own connection when it has one: a connection that
    /// stays warm, where the pool would hand out whichever of its connections idled longest (after
    /// a burst, each append would run on a different backend, with cold caches) and check it with a
    /// round trip first. If that connection turns out to be broken (it idled through a server
    /// restart, say), the append is made once more through the pool, which opens a healthy one; a
    /// first attempt that did commit before the connection broke is then recognised by its event
    /// ids (and its command id), never written twice.
    async fn single(
        &self,
        conn: &mut Option<PgConnection>,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
        metadata: &Metadata,
        command: Option<&CommandRecord>,
    ) -> Result<Appended, StoreError> {
        if let Some(c) = conn.as_mut() {
            let appended = append_on(
                c,
                self.partitions,
                stream_id,
                expected,
                events,
                metadata,
                command,
            )
            .await;
            if !matches!(&appended, Err(StoreError::Database(e)) if connection_lost(e)) {
                return appended;
            }
            *conn = None;
            metrics::counter!("nura_store_group_commit_reconnects_total").increment(1);
        }
        append_one(
            &self.pool,
            self.partitions,
            stream_id,
            expected,
            events,
            metadata,
            command,
        )
        .await
    }

    /// Returns the lane's own connection for the next statement.
    fn put_back(&self, conn: Option<PgConnection>) {
        if let Some(c) = conn {
            self.conn.lock().expect("lane connection").0 = Some(c);
        }
    }

    /// The lane's own connection, opened if missing (unless an attempt failed less than
    /// [`RECONNECT_AFTER`] ago). None: use the pool.
    async fn own_connection(&self) -> Option<PgConnection> {
        let failed_at = {
            let mut c = self.conn.lock().expect("lane connection");
            if let Some(conn) = c.0.take() {
                return Some(conn);
            }
            c.1
        };
        if failed_at.is_some_and(|t| t.elapsed() < RECONNECT_AFTER) {
            return None;
        }
        match self.batch_options.connect().await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::debug!(error = %e, "group commit lane connection not opened; using the pool");
                self.conn.lock().expect("lane connection").1 = Some(Instant::now());
                None
            }
        }
    }
}

/// The connection itself failed (its socket, the protocol, or the server ending the session: class
/// 57P "operator intervention", class 08 "connection exception"); any other error is the
/// statement's own and is answered as it is.
fn connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("57P") || c.starts_with("08")),
        _ => false,
    }
}

/// Takes at most `max_batch` requests, at most one per stream: a second one on the same stream
/// must see the first one's outcome, so it waits for the next batch, keeping its place.
fn take_batch(
    pending: &mut VecDeque<(AppendRequest, Reply)>,
    max_batch: usize,
) -> Vec<(AppendRequest, Reply)> {
    let mut batch = Vec::new();
    let mut streams = HashSet::new();
    let mut later = VecDeque::new();
    while let Some(r) = pending.pop_front() {
        if batch.len() >= max_batch {
            later.push_back(r);
            later.extend(pending.drain(..));
            break;
        }
        if streams.insert(r.0.stream_id.clone()) {
            batch.push(r);
        } else {
            later.push_back(r);
        }
    }
    *pending = later;
    batch
}

async fn one(pool: &PgPool, partitions: i32, req: &AppendRequest) -> Result<Appended, StoreError> {
    append_one(
        pool,
        partitions,
        &req.stream_id,
        req.expected,
        &req.events,
        &req.metadata,
        req.command.as_ref(),
    )
    .await
}

/// Checks every command (its stream's version, whether its id is recorded), inserts the events
/// of those that pass and their idempotency records, and returns one row per command (`idx`,
/// the stream's version `v` before the batch, `seen` = its command id was already recorded) and
/// one row per inserted event (`stream_id`, `v` = its version, `pos`, `tx`).
const BATCH_SQL: &str = "\
WITH req AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::int[], $4::bigint[], $5::text[], $6::bytea[], $7::jsonb[], $8::int[])
        AS r(idx, stream_id, partition, expected, command_id, request_hash, metadata, n)
), chk AS (
    SELECT r.*,
           coalesce((SELECT max(e.stream_version) FROM es.events e WHERE e.stream_id = r.stream_id), 0) AS v,
           r.command_id IS NOT NULL
               AND coalesce((SELECT true FROM es.commands k WHERE k.command_id = r.command_id), false)
               AS seen
    FROM req r
), accepted AS (
    SELECT * FROM chk WHERE NOT seen AND (expected IS NULL OR expected = v)
), ins AS (
    INSERT INTO es.events (event_id, stream_id, stream_version, partition, event_type, schema_version, payload, metadata)
    SELECT ev.event_id, a.stream_id, a.v + ev.ord, a.partition, ev.event_type, ev.schema_version, ev.payload, a.metadata
    FROM unnest($9::int[], $10::int[], $11::uuid[], $12::text[], $13::int[], $14::jsonb[])
            AS ev(idx, ord, event_id, event_type, schema_version, payload)
    JOIN accepted a USING (idx)
    ORDER BY ev.idx, ev.ord
    RETURNING stream_id, stream_version, global_position, transaction_id
), cmd AS (
    INSERT INTO es.commands (command_id, request_hash, stream_id, first_version, last_version)
    SELECT command_id, request_hash, stream_id, v + 1, v + n FROM accepted WHERE command_id IS NOT NULL
)
SELECT idx, NULL::text AS stream_id, v, seen::int::bigint AS pos, NULL::bigint AS tx FROM chk
UNION ALL
SELECT NULL, stream_id, stream_version, global_position, transaction_id::text::bigint FROM ins";

/// Runs a batch on `db` and answers every command; false when the statement failed for a
/// reason other than a refusal (the connection may be broken). Commands left out of the batch
/// are answered on their own through `pool`.
async fn run_batch<'c, E>(
    db: E,
    pool: &PgPool,
    partitions: i32,
    batch: Vec<(AppendRequest, Reply)>,
) -> bool
where
    E: Executor<'c, Database = Postgres>,
{
    let n = batch.len();
    let mut r_idx = Vec::with_capacity(n);
    let mut r_stream = Vec::with_capacity(n);
    let mut r_partition = Vec::with_capacity(n);
    let mut r_expected = Vec::with_capacity(n);
    let mut r_command = Vec::with_capacity(n);
    let mut r_hash = Vec::with_capacity(n);
    let mut r_meta = Vec::with_capacity(n);
    let mut r_count = Vec::with_capacity(n);
    let (mut e_idx, mut e_ord, mut e_id, mut e_type, mut e_schema, mut e_payload) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (i, (req, _)) in batch.iter().enumerate() {
        let i = i as i32;
        r_idx.push(i);
        r_stream.push(req.stream_id.as_str());
        r_partition.push(partition_of(&req.stream_id, partitions));
        r_expected.push(match req.expected {
            ExpectedVersion::Any => None,
            ExpectedVersion::Exact(v) => Some(v),
        });
        r_command.push(req.command.as_ref().map(|c| c.command_id.as_str()));
        r_hash.push(req.command.as_ref().map(|c| c.request_hash.as_slice()));
        r_meta.push(sqlx::types::Json(&req.metadata));
        r_count.push(req.events.len() as i32);
        for (ord, e) in req.events.iter().enumerate() {
            e_idx.push(i);
            e_ord.push(ord as i32 + 1);
            e_id.push(e.event_id);
            e_type.push(e.event_type.as_str());
            e_schema.push(e.schema_version);
            e_payload.push(&e.payload);
        }
    }
    let started = Instant::now();
    let result = sqlx::query(BATCH_SQL)
        .bind(&r_idx)
        .bind(&r_stream)
        .bind(&r_partition)
        .bind(&r_expected)
        .bind(&r_command)
        .bind(&r_hash)
        .bind(&r_meta)
        .bind(&r_count)
        .bind(&e_idx)
        .bind(&e_ord)
        .bind(&e_id)
        .bind(&e_type)
        .bind(&e_schema)
        .bind(&e_payload)
        .fetch_all(db)
        .await;
    // How long a batch statement takes (commit and WAL flush included): with the batch sizes
    // in `nura_store_group_commit_size`, it tells whether a lane is slow or starved of work.
    metrics::histogram!("nura_store_group_commit_batch_seconds")
        .record(started.elapsed().as_secs_f64());
    // None: answer on its own (left out because its command id exists, or the batch failed).
    let mut done: Vec<Option<Result<Appended, StoreError>>> = (0..n).map(|_| None).collect();
    match result {
        Ok(rows) => {
            // Per command: the version before the batch and whether its id was recorded; per
            // accepted stream: its last event (version, position, transaction).
            let mut checked: Vec<Option<(i64, bool)>> = vec![None; n];
            let mut last: HashMap<String, (i64, i64, i64)> = HashMap::with_capacity(n);
            let mut undecoded = false;
            for row in rows {
                let decoded: Result<(), sqlx::Error> = (|| {
                    let idx: Option<i32> = row.try_get(0)?;
                    let v: i64 = row.try_get(2)?;
                    let pos: i64 = row.try_get(3)?;
                    match idx {
                        Some(i) => {
                            if let Some(c) = checked.get_mut(i as usize) {
                                *c = Some((v, pos != 0));
                            }
                        }
                        None => {
                            let stream: String = row.try_get(1)?;
                            let tx: i64 = row.try_get(4)?;
                            let e = last.entry(stream).or_insert((v, pos, tx));
                            if v > e.0 {
                                *e = (v, pos, tx);
                            }
                        }
                    }
                    Ok(())
                })();
                if let Err(e) = decoded {
                    tracing::warn!(error = %e, "group commit row not decoded");
                    undecoded = true;
                }
            }
            for (i, (req, _)) in batch.iter().enumerate() {
                let Some((v, seen)) = checked[i] else {
                    continue;
                };
                if seen {
                    continue;
                }
                done[i] = Some(match last.get(&req.stream_id) {
                    Some(&(last_version, pos, tx)) => Ok(Appended {
                        stream_id: req.stream_id.clone(),
                        first_version: v + 1,
                        last_version,
                        commit: CommitToken {
                            position: Position { tx, pos },
                            partition: r_partition[i],
                        },
                        event_ids: req.events.iter().map(|e| e.event_id).collect(),
                        replayed: false,
                    }),
                    // A row we could not read may have been this command's: ask on its own.
                    None if undecoded => continue,
                    // Checked in the same snapshot: the stream moved and the command id is new.
                    None => Err(StoreError::Conflict {
                        stream_id: req.stream_id.clone(),
                        expected: req.expected,
                    }),
                });
            }
        }
        Err(e) => {
            let refused = e
                .as_database_error()
                .is_some_and(|d| d.is_unique_violation() || d.code().as_deref() == Some("40P01"));
            if !refused {
                // The database is unreachable or broken: every command of the batch fails alike.
                let msg = e.to_string();
                tracing::warn!(error = %msg, size = n, "group commit failed");
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Database(sqlx::Error::Protocol(
                        msg.clone(),
                    ))));
                }
                return false;
            }
            metrics::counter!("nura_store_group_commit_fallbacks_total").increment(1);
        }
    }
    // Commands left out of the batch (or the whole batch after a refusal) are answered one by one.
    for ((req, reply), appended) in batch.into_iter().zip(done) {
        let r = match appended {
            Some(r) => r,
            None => one(pool, partitions, &req).await,
        };
        let _ = reply.send(r);
    }
    true
}
