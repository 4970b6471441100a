//! Group commit: concurrent appends share one statement, one transaction and one WAL flush.
//!
//! Appends are routed to a lane by their stream id (a stream always lands in the same lane, so a
//! lane's batches never race each other on a stream). A lane takes whatever is waiting — at most
//! one command per stream and `max_batch` commands — and writes it with one statement that
//! checks every command's expected version and idempotency key on its own: a command whose
//! check fails is left out of the batch and answered individually (conflict, replay or
//! mismatch), so one command's conflict never fails another. If the batch statement itself is
//! refused (a race with another process on a unique key, a deadlock), every command of the batch
//! is retried on its own. Under light load a batch holds one command and takes the plain path.

use crate::event::{
    Appended, CommandRecord, CommitToken, ExpectedVersion, Metadata, NewEvent, Position,
    partition_of,
};
use crate::postgres::{StoreError, append_one};
use sqlx::Row;
use sqlx::postgres::PgPool;
use std::collections::{HashSet, VecDeque};
use tokio::sync::{mpsc, oneshot};

/// One command's append, owned so it can wait in a lane.
pub(crate) struct AppendRequest {
    pub stream_id: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub metadata: Metadata,
    pub command: Option<CommandRecord>,
}

type Reply = oneshot::Sender<Result<Appended, StoreError>>;

/// The lanes of a store with group commit.
#[derive(Clone, Debug)]
pub(crate) struct GroupCommit {
    lanes: Vec<mpsc::UnboundedSender<(AppendRequest, Reply)>>,
}

impl GroupCommit {
    /// Starts `lanes` committer tasks on the current runtime. They end when the last store
    /// handle is dropped.
    pub(crate) fn start(
        pool: PgPool,
        partitions: i32,
        lanes: usize,
        max_batch: usize,
    ) -> GroupCommit {
        let lanes = (0..lanes.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(lane(pool.clone(), partitions, rx, max_batch.max(1)));
                tx
            })
            .collect();
        GroupCommit { lanes }
    }

    /// Queues an append and waits for its own outcome.
    pub(crate) async fn append(&self, req: AppendRequest) -> Result<Appended, StoreError> {
        let lane = partition_of(&req.stream_id, self.lanes.len() as i32) as usize;
        let (tx, rx) = oneshot::channel();
        self.lanes[lane]
            .send((req, tx))
            .map_err(|_| StoreError::Corrupt("group commit lane stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Corrupt("group commit lane dropped a request".into()))?
    }
}

async fn lane(
    pool: PgPool,
    partitions: i32,
    mut rx: mpsc::UnboundedReceiver<(AppendRequest, Reply)>,
    max_batch: usize,
) {
    let mut pending: VecDeque<(AppendRequest, Reply)> = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(r) => pending.push_back(r),
                None => return,
            }
        }
        while pending.len() < max_batch * 4 {
            match rx.try_recv() {
                Ok(r) => pending.push_back(r),
                Err(_) => break,
            }
        }
        // At most one command per stream in a batch: a second one on the same stream must see
        // the first one's outcome, so it waits for the next batch.
        let mut batch = Vec::new();
        let mut streams = HashSet::new();
        let mut later = VecDeque::new();
        while let Some(r) = pending.pop_front() {
            if batch.len() < max_batch && streams.insert(r.0.stream_id.clone()) {
                batch.push(r);
            } else {
                later.push_back(r);
            }
        }
        pending = later;
        metrics::histogram!("nura_store_group_commit_size").record(batch.len() as f64);
        if batch.len() == 1 {
            let (req, reply) = batch.pop().expect("one request");
            let r = one(&pool, partitions, &req).await;
            let _ = reply.send(r);
        } else {
            run_batch(&pool, partitions, batch).await;
        }
    }
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

const BATCH_SQL: &str = "\
WITH req AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::int[], $4::bigint[], $5::text[], $6::bytea[], $7::jsonb[])
        AS r(idx, stream_id, partition, expected, command_id, request_hash, metadata)
), ok AS (
    SELECT r.*, coalesce((SELECT max(e.stream_version) FROM es.events e WHERE e.stream_id = r.stream_id), 0) AS v
    FROM req r
    WHERE r.command_id IS NULL OR NOT EXISTS (SELECT 1 FROM es.commands k WHERE k.command_id = r.command_id)
), accepted AS (
    SELECT * FROM ok WHERE expected IS NULL OR expected = v
), ins AS (
    INSERT INTO es.events (event_id, stream_id, stream_version, partition, event_type, schema_version, payload, metadata)
    SELECT ev.event_id, a.stream_id, a.v + ev.ord, a.partition, ev.event_type, ev.schema_version, ev.payload, a.metadata
    FROM unnest($8::int[], $9::int[], $10::uuid[], $11::text[], $12::int[], $13::jsonb[])
            AS ev(idx, ord, event_id, event_type, schema_version, payload)
    JOIN accepted a USING (idx)
    ORDER BY ev.idx, ev.ord
    RETURNING stream_id, event_id, stream_version, global_position, transaction_id::text::bigint AS tx
), summary AS (
    -- Streams are unique within a batch, so a stream's place in $2 names its command: looking it
    -- up in the array keeps the statement linear where joining two CTEs (estimated at one row
    -- each) made the planner pick nested loops over the whole batch.
    SELECT array_position($2::text[], stream_id) AS n, min(stream_version) AS first_v,
           max(stream_version) AS last_v,
           (array_agg(global_position ORDER BY stream_version DESC))[1] AS last_pos, max(tx) AS tx,
           jsonb_agg(event_id ORDER BY stream_version) AS event_ids
    FROM ins GROUP BY stream_id
), cmd AS (
    INSERT INTO es.commands (command_id, request_hash, stream_id, result)
    SELECT ($5::text[])[s.n], ($6::bytea[])[s.n], ($2::text[])[s.n], jsonb_build_object(
        'stream_id', ($2::text[])[s.n], 'first_version', s.first_v, 'last_version', s.last_v,
        'commit', s.tx::text || '.' || s.last_pos::text || '.' || (($3::int[])[s.n])::text,
        'event_ids', s.event_ids)
    FROM summary s
    WHERE ($5::text[])[s.n] IS NOT NULL
    RETURNING 1
)
SELECT r.idx, s.first_v, s.last_v, s.last_pos, s.tx,
       CASE WHEN s.n IS NOT NULL THEN 'ok' WHEN o.idx IS NULL THEN 'exists' ELSE 'conflict' END
FROM req r LEFT JOIN ok o USING (idx) LEFT JOIN summary s ON s.n = r.idx + 1";

async fn run_batch(pool: &PgPool, partitions: i32, batch: Vec<(AppendRequest, Reply)>) {
    let mut r_idx = Vec::new();
    let mut r_stream = Vec::new();
    let mut r_partition = Vec::new();
    let mut r_expected = Vec::new();
    let mut r_command = Vec::new();
    let mut r_hash = Vec::new();
    let mut r_meta = Vec::new();
    let (mut e_idx, mut e_ord, mut e_id, mut e_type, mut e_schema, mut e_payload) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (i, (req, _)) in batch.iter().enumerate() {
        let i = i as i32;
        r_idx.push(i);
        r_stream.push(req.stream_id.clone());
        r_partition.push(partition_of(&req.stream_id, partitions));
        r_expected.push(match req.expected {
            ExpectedVersion::Any => None,
            ExpectedVersion::Exact(v) => Some(v),
        });
        r_command.push(req.command.as_ref().map(|c| c.command_id.clone()));
        r_hash.push(req.command.as_ref().map(|c| c.request_hash.clone()));
        r_meta.push(serde_json::to_value(&req.metadata).unwrap_or_default());
        for (ord, e) in req.events.iter().enumerate() {
            e_idx.push(i);
            e_ord.push(ord as i32 + 1);
            e_id.push(e.event_id);
            e_type.push(e.event_type.clone());
            e_schema.push(e.schema_version);
            e_payload.push(e.payload.clone());
        }
    }
    let result = sqlx::query(BATCH_SQL)
        .bind(&r_idx)
        .bind(&r_stream)
        .bind(&r_partition)
        .bind(&r_expected)
        .bind(&r_command)
        .bind(&r_hash)
        .bind(&r_meta)
        .bind(&e_idx)
        .bind(&e_ord)
        .bind(&e_id)
        .bind(&e_type)
        .bind(&e_schema)
        .bind(&e_payload)
        .fetch_all(pool)
        .await;
    // None: answer on its own (left out because its command id exists, or the batch failed).
    let mut done: Vec<Option<Result<Appended, StoreError>>> =
        (0..batch.len()).map(|_| None).collect();
    match result {
        Ok(rows) => {
            for row in rows {
                let Ok(idx) = row.try_get::<i32, _>(0) else {
                    continue;
                };
                let Some((req, _)) = batch.get(idx as usize) else {
                    continue;
                };
                let status: String = row.try_get(5).unwrap_or_default();
                if status == "conflict" {
                    // Checked in the same snapshot: the stream moved and the command id is new.
                    done[idx as usize] = Some(Err(StoreError::Conflict {
                        stream_id: req.stream_id.clone(),
                        expected: req.expected,
                    }));
                    continue;
                }
                let parsed: Result<(i64, i64, i64, i64), sqlx::Error> = (|| {
                    Ok((
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                        row.try_get(4)?,
                    ))
                })();
                let (true, Ok((first_version, last_version, last_pos, tx))) =
                    (status == "ok", parsed)
                else {
                    continue;
                };
                done[idx as usize] = Some(Ok(Appended {
                    stream_id: req.stream_id.clone(),
                    first_version,
                    last_version,
                    commit: CommitToken {
                        position: Position { tx, pos: last_pos },
                        partition: r_partition[idx as usize],
                    },
                    event_ids: req.events.iter().map(|e| e.event_id).collect(),
                    replayed: false,
                }));
            }
        }
        Err(e) => {
            let refused = e
                .as_database_error()
                .is_some_and(|d| d.is_unique_violation() || d.code().as_deref() == Some("40P01"));
            if !refused {
                // The database is unreachable or broken: every command of the batch fails alike.
                let msg = e.to_string();
                tracing::warn!(error = %msg, size = batch.len(), "group commit failed");
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Database(sqlx::Error::Protocol(
                        msg.clone(),
                    ))));
                }
                return;
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
}
