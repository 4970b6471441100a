//! The Postgres backend of the event store.

use crate::event::{
    Appended, CommandRecord, CommitToken, ExpectedVersion, Metadata, NewEvent, Position, RawEvent,
    RecordedEvent, partition_of,
};
use crate::group::GroupCommit;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool, PgRow};
use uuid::Uuid;

/// The channel the store notifies after appends: a wake-up hint for log readers, never a
/// guarantee.
pub const NOTIFY_CHANNEL: &str = "nura_events";

/// Sends `NOTIFY` after appends, from one task, coalescing whatever appends happened while the
/// previous notification was sent and during a pause of [`NOTIFY_INTERVAL`] after it. NOTIFY
/// inside the appending transactions would serialize their commits on Postgres' global
/// notification-queue lock (measured with pgbench, 32 clients: 9,849 single-row inserts/s without
/// it, 3,180 with it); one NOTIFY per append from here would cost every append a second round
/// trip and a second backend wake-up.
///
/// The task notifies over a connection of its own (not a pooled one, which the pool would first
/// ping), and each notification's payload is the store's [`EventStore::notification_origin`], so
/// a log reader of this process, already woken through [`EventStore::appended`], can ignore it.
#[derive(Clone, Debug)]
struct Notifier {
    poke: tokio::sync::mpsc::Sender<()>,
    origin: std::sync::Arc<str>,
    /// Counts appends of this process, for log readers in the same process (the relay of
    /// `nura serve`): they wake on it without the `NOTIFY` round trip through Postgres.
    local: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

/// The longest a log reader's wake-up waits for appends to coalesce. Readers poll as well, so
/// this bounds added latency, never correctness.
const NOTIFY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

impl Notifier {
    /// Starts the notifying task; it ends when the last store handle is dropped.
    fn start(pool: PgPool) -> Notifier {
        let (poke, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let origin: std::sync::Arc<str> = Uuid::new_v4().simple().to_string().into();
        let options = (*pool.connect_options())
            .clone()
            .application_name(NOTIFIER_APPLICATION_NAME);
        drop(pool);
        let payload = origin.clone();
        tokio::spawn(async move {
            let mut conn: Option<PgConnection> = None;
            while rx.recv().await.is_some() {
                if let Err(e) = notify(&mut conn, &options, &payload).await {
                    // Readers poll as well: a lost hint only costs latency. The next one opens
                    // a new connection.
                    conn = None;
                    tracing::debug!(error = %e, "append notification not sent");
                }
                // Appends committed from now on poke the channel and get the next notification.
                tokio::time::sleep(NOTIFY_INTERVAL).await;
            }
        });
        Notifier {
            poke,
            origin,
            local: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// Asks for a notification (a full channel means one is already due) and tells this
    /// process's log readers.
    fn poke(&self) {
        self.local.send_modify(|n| *n = n.wrapping_add(1));
        let _ = self.poke.try_send(());
    }
}

/// The `application_name` of the connection a store sends its notifications on.
pub const NOTIFIER_APPLICATION_NAME: &str = "nura-notify";

/// Sends one notification on `conn`, connecting first if there is none.
async fn notify(
    conn: &mut Option<PgConnection>,
    options: &sqlx::postgres::PgConnectOptions,
    payload: &str,
) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    if conn.is_none() {
        let connect = tokio::time::timeout(std::time::Duration::from_secs(5), options.connect());
        *conn = Some(connect.await.map_err(|_| {
            sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to notify timed out",
            ))
        })??);
    }
    let c = conn.as_mut().expect("connected above");
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(payload)
        .execute(c)
        .await?;
    Ok(())
}

/// Why an append or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the expected version (HTTP 409).
    #[error("stream {stream_id} is not at the expected version {expected:?}")]
    Conflict {
        stream_id: String,
        expected: ExpectedVersion,
    },
    /// An event id is already in the log (HTTP 409).
    #[error("event id already stored")]
    DuplicateEvent,
    /// The command id was used before with a different request (HTTP 422).
    #[error("command id {0} was already used for a different request")]
    IdempotencyMismatch(String),
    /// The command id is already recorded (resolved inside [`EventStore::append`] into a replay
    /// or [`StoreError::IdempotencyMismatch`]; callers never see it).
    #[error("command id already recorded")]
    CommandExists,
    /// An append with zero events; the store never writes empty commands.
    #[error("a command must append at least one event")]
    NoEvents,
    /// Postgres failed; details go to the log, never to clients (HTTP 500/503).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored row could not be decoded.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
}

/// The event store over one Postgres database.
#[derive(Clone, Debug)]
pub struct EventStore {
    pool: PgPool,
    partitions: i32,
    group: Option<GroupCommit>,
    notifier: Notifier,
}

/// The envelope columns of `es.events e`. `transaction_id` is returned as a bigint under its own
/// name, so every `ORDER BY` must name the table's columns (`e.transaction_id`): a bare name
/// sorts by the bigint output column, which no index provides, and Postgres then sorts the whole
/// rest of the log for every batch.
const EVENT_COLUMNS: &str = "e.event_id, e.stream_id, e.stream_version, e.global_position, \
    e.transaction_id::text::bigint AS transaction_id, e.partition, e.event_type, e.schema_version, \
    e.payload, e.metadata, e.recorded_at";

/// [`EVENT_COLUMNS`] for [`RawPage`]: `payload` and `metadata` as text (`jsonb` is sent as text
/// in either case, and text decodes as a `&str` borrowed from the row), then `tenant_id`.
const RAW_EVENT_COLUMNS: &str = "e.event_id, e.stream_id, e.stream_version, e.global_position, \
    e.transaction_id::text::bigint AS transaction_id, e.partition, e.event_type, e.schema_version, \
    e.payload::text AS payload, e.metadata::text AS metadata, e.recorded_at, \
    coalesce(e.metadata->>'tenant_id', '') AS tenant_id";

/// The log after `($1, $2)` in commit order, at most `$3` events, stopping before the oldest
/// transaction still open anywhere in the cluster: the rows of [`EventStore::read_all`] and
/// [`EventStore::read_all_raw`].
const LOG_AFTER: &str = "FROM es.events e \
    WHERE (e.transaction_id, e.global_position) > ($1::bigint::text::xid8, $2) \
      AND e.transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
    ORDER BY e.transaction_id, e.global_position LIMIT $3";

impl EventStore {
    /// Changes after every committed append made through this store (or a clone of it) in this
    /// process: a wake-up for a log reader in the same process, faster than the `NOTIFY` on
    /// [`NOTIFY_CHANNEL`] that reaches other processes. Like it, only a hint.
    pub fn appended(&self) -> tokio::sync::watch::Receiver<u64> {
        self.notifier.local.subscribe()
    }

    /// The payload of this store's notifications on [`NOTIFY_CHANNEL`], unique to this store and
    /// its clones: a reader that also follows [`EventStore::appended`] skips notifications
    /// carrying it, since it was woken for those appends already.
    pub fn notification_origin(&self) -> &str {
        &self.notifier.origin
    }

    /// Opens the store over a migrated database, reading its fixed partition count.
    pub async fn connect(pool: PgPool) -> Result<Self, StoreError> {
        let partitions: i32 = sqlx::query_scalar("SELECT partitions FROM es.settings")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            notifier: Notifier::start(pool.clone()),
            pool,
            partitions,
            group: None,
        })
    }

    /// Opens the store with group commit: concurrent appends are gathered into one statement and
    /// one WAL flush; each command keeps its own outcome. `lanes`
    /// committers run side by side, a stream always in the same lane.
    pub async fn connect_with_group_commit(
        pool: PgPool,
        lanes: usize,
        max_batch: usize,
    ) -> Result<Self, StoreError> {
        let mut store = Self::connect(pool).await?;
        store.group = Some(GroupCommit::start(
            store.pool.clone(),
            store.partitions,
            lanes,
            max_batch,
        ));
        Ok(store)
    }

    /// The connection pool (shared with readers of read models in the same process).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The fixed number of partitions streams are spread over.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Appends a command's events to one stream, atomically.
    ///
    /// With a `command`, the append is idempotent: a repeat of the same command id and request
    /// hash returns the first [`Appended`] (with `replayed = true`) and writes nothing; the same id
    /// with another hash is [`StoreError::IdempotencyMismatch`]. The idempotency check wins over
    /// the version check, so a retried command whose first attempt succeeded is never a conflict.
    ///
    /// The common path is one statement in autocommit: one round trip and one WAL flush (its
    /// server time is still about twice a plain single-row insert's: the version check and the
    /// idempotency record). Log readers are woken by a coalesced `NOTIFY` afterwards. Only
    /// refusals (conflicts, repeats) take a second query.
    pub async fn append(
        &self,
        stream_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
        metadata: &Metadata,
        command: Option<&CommandRecord>,
    ) -> Result<Appended, StoreError> {
        if events.is_empty() {
            return Err(StoreError::NoEvents);
        }
        let started = std::time::Instant::now();
        let result = match &self.group {
            Some(group) => {
                group
                    .append(stream_id, expected, events, metadata, command)
                    .await
            }
            None => {
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
        };
        match &result {
            Ok(a) => {
                if !a.replayed {
                    self.notifier.poke();
                }
                metrics::counter!("nura_store_appended_events_total")
                    .increment(events.len() as u64);
                metrics::histogram!("nura_store_append_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(StoreError::Conflict { .. }) => {
                metrics::counter!("nura_store_conflicts_total").increment(1)
            }
            Err(_) => {}
        }
        result
    }

    /// The request hash and first result (marked `replayed`) recorded for a command id, if the
    /// command was appended before; lets a caller answer a repeat before deciding anything.
    pub async fn recorded_command(
        &self,
        command_id: &str,
    ) -> Result<Option<(Vec<u8>, Option<Appended>)>, StoreError> {
        recorded_command(&mut *self.pool.acquire().await?, command_id).await
    }

    /// The current version of a stream (0 when it has no events).
    pub async fn stream_version(&self, stream_id: &str) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(max(stream_version), 0) FROM es.events WHERE stream_id = $1",
        )
        .bind(stream_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Reads one stream's events with `stream_version > after_version`, oldest first.
    pub async fn read_stream(
        &self,
        stream_id: &str,
        after_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM es.events e WHERE e.stream_id = $1 AND e.stream_version > $2 \
             ORDER BY e.stream_version LIMIT $3"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(stream_id)
            .bind(after_version)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_event).collect()
    }

    /// Reads the whole log after `after`, in commit order, up to `limit` events, stopping before
    /// the oldest transaction still open anywhere in the cluster (its events may yet commit with
    /// positions below ones already visible). Checkpoint the returned events' [`Position`]s.
    pub async fn read_all(
        &self,
        after: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = self.read_log(EVENT_COLUMNS, after, limit).await?;
        rows.iter().map(decode_event).collect()
    }

    /// [`EventStore::read_all`] for readers that pass events on: the same rows, in the same
    /// order, with the same stop before the oldest open transaction, kept as Postgres sent them.
    /// `payload` and `metadata` arrive as JSON text and are never parsed, `tenant_id` comes from
    /// Postgres, and [`RawPage::events`] borrows every text field from the page instead of
    /// copying it.
    pub async fn read_all_raw(&self, after: Position, limit: i64) -> Result<RawPage, StoreError> {
        Ok(RawPage {
            rows: self.read_log(RAW_EVENT_COLUMNS, after, limit).await?,
        })
    }

    /// `columns` of the log's rows after `after` in commit order, up to `limit` ([`LOG_AFTER`]).
    async fn read_log(
        &self,
        columns: &str,
        after: Position,
        limit: i64,
    ) -> Result<Vec<sqlx::postgres::PgRow>, StoreError> {
        let sql = format!("SELECT {columns} {LOG_AFTER}");
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after.tx)
            .bind(after.pos)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Reads the first `limit` of one partition's events in `(after, up_to]`, in commit order.
    /// Used to fill a hole when JetStream lost messages: `up_to` must be a position a log reader
    /// has already seen, so everything below it is final.
    pub async fn read_partition(
        &self,
        partition: i32,
        after: Position,
        up_to: Position,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM es.events e WHERE e.partition = $1 \
               AND (e.transaction_id, e.global_position) > ($2::bigint::text::xid8, $3) \
               AND (e.transaction_id, e.global_position) <= ($4::bigint::text::xid8, $5) \
             ORDER BY e.transaction_id, e.global_position LIMIT $6"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(partition)
            .bind(after.tx)
            .bind(after.pos)
            .bind(up_to.tx)
            .bind(up_to.pos)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_event).collect()
    }

    /// The position of the last event of `partition` strictly before `before`, if any: the
    /// previous link of the partition chain that projectors check.
    pub async fn previous_in_partition(
        &self,
        partition: i32,
        before: Position,
    ) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query(
            "SELECT transaction_id::text::bigint, global_position FROM es.events WHERE partition = $1 \
               AND (transaction_id, global_position) < ($2::bigint::text::xid8, $3) \
             ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
        )
        .bind(partition)
        .bind(before.tx)
        .bind(before.pos)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| Position {
            tx: r.get(0),
            pos: r.get(1),
        }))
    }

    /// Fetches events by id (for retrying dead letters), in commit order.
    pub async fn events_by_id(&self, ids: &[Uuid]) -> Result<Vec<RecordedEvent>, StoreError> {
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM es.events e WHERE e.event_id = ANY($1) \
             ORDER BY e.transaction_id, e.global_position"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(decode_event).collect()
    }

    /// Seconds the oldest open transaction of the cluster has been running: it holds every log
    /// reader back, so operators watch it.
    pub async fn oldest_open_transaction_seconds(&self) -> Result<f64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(extract(epoch FROM now() - min(xact_start))::float8, 0) \
             FROM pg_stat_activity WHERE backend_xid IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Number of events in the log at or before `up_to` in commit order.
    pub async fn count_until(&self, up_to: Position) -> Result<i64, StoreError> {
        self.count_between(Position::ZERO, up_to).await
    }

    /// Number of events in the log after `after` and at or before `up_to`, in commit order: a
    /// range scan of the commit-order index, as cheap as the range is short.
    pub async fn count_between(&self, after: Position, up_to: Position) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM es.events \
             WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
               AND (transaction_id, global_position) <= ($3::bigint::text::xid8, $4)",
        )
        .bind(after.tx)
        .bind(after.pos)
        .bind(up_to.tx)
        .bind(up_to.pos)
        .fetch_one(&self.pool)
        .await?)
    }
}

/// Appends one command on its own: one statement; a refusal is resolved into a replay of an
/// earlier identical command, an idempotency mismatch or a conflict.
pub(crate) async fn append_one(
    pool: &PgPool,
    partitions: i32,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
    metadata: &Metadata,
    command: Option<&CommandRecord>,
) -> Result<Appended, StoreError> {
    let mut conn = pool.acquire().await?;
    append_on(
        &mut conn, partitions, stream_id, expected, events, metadata, command,
    )
    .await
}

/// [`append_one`] on a connection the caller holds.
pub(crate) async fn append_on(
    conn: &mut PgConnection,
    partitions: i32,
    stream_id: &str,
    expected: ExpectedVersion,
    events: &[NewEvent],
    metadata: &Metadata,
    command: Option<&CommandRecord>,
) -> Result<Appended, StoreError> {
    let result = insert_events(
        conn, stream_id, partitions, expected, events, metadata, command,
    )
    .await;
    match (result, command) {
        // A refused insert may be a repeat of an earlier command: that answer wins.
        (Err(e @ (StoreError::Conflict { .. } | StoreError::CommandExists)), Some(cmd)) => {
            match first_result(conn, cmd).await? {
                Some(first) => {
                    metrics::counter!("nura_store_idempotent_replays_total").increment(1);
                    Ok(first)
                }
                // The earlier attempt rolled back in the meantime: try once more.
                None if matches!(e, StoreError::CommandExists) => {
                    insert_events(
                        conn, stream_id, partitions, expected, events, metadata, command,
                    )
                    .await
                }
                None => Err(e),
            }
        }
        (r, _) => r,
    }
}

/// The stored first result of a command, if it exists with the same request hash; a different
/// hash is [`StoreError::IdempotencyMismatch`].
async fn first_result(
    conn: &mut PgConnection,
    cmd: &CommandRecord,
) -> Result<Option<Appended>, StoreError> {
    match recorded_command(conn, &cmd.command_id).await? {
        None => Ok(None),
        Some((hash, _)) if hash != cmd.request_hash => {
            Err(StoreError::IdempotencyMismatch(cmd.command_id.clone()))
        }
        Some((_, first)) => first.map(Some).ok_or_else(|| {
            StoreError::Corrupt(format!("command {} has no result", cmd.command_id))
        }),
    }
}

/// A command's idempotency record with its first result, read back from the events it wrote
/// (records from before migration 0005 carry the result as jsonb instead).
const RECORDED_SQL: &str = "\
SELECT k.request_hash, k.result, k.stream_id, k.first_version, k.last_version,
       w.event_ids, w.last_pos, w.tx, w.partition
FROM es.commands k
LEFT JOIN LATERAL (
    SELECT array_agg(e.event_id ORDER BY e.stream_version) AS event_ids,
           (array_agg(e.global_position ORDER BY e.stream_version DESC))[1] AS last_pos,
           (array_agg(e.transaction_id::text::bigint))[1] AS tx,
           (array_agg(e.partition))[1] AS partition
    FROM es.events e
    WHERE e.stream_id = k.stream_id AND e.stream_version BETWEEN k.first_version AND k.last_version
) w ON k.first_version IS NOT NULL
WHERE k.command_id = $1";

/// The request hash and first result (marked `replayed`) recorded for a command id.
async fn recorded_command(
    conn: &mut PgConnection,
    command_id: &str,
) -> Result<Option<(Vec<u8>, Option<Appended>)>, StoreError> {
    let Some(row) = sqlx::query(RECORDED_SQL)
        .bind(command_id)
        .fetch_optional(conn)
        .await?
    else {
        return Ok(None);
    };
    let hash: Vec<u8> = row.try_get(0)?;
    let legacy: Option<sqlx::types::Json<Appended>> = row
        .try_get(1)
        .map_err(|e| StoreError::Corrupt(format!("command result: {e}")))?;
    if let Some(r) = legacy {
        return Ok(Some((
            hash,
            Some(Appended {
                replayed: true,
                ..r.0
            }),
        )));
    }
    let versions: (Option<i64>, Option<i64>) = (row.try_get(3)?, row.try_get(4)?);
    let (Some(first_version), Some(last_version)) = versions else {
        return Ok(Some((hash, None)));
    };
    let event_ids: Option<Vec<Uuid>> = row.try_get(5)?;
    let written = event_ids.as_ref().map_or(0, |ids| ids.len() as i64);
    let (Some(event_ids), Some(pos), Some(tx), Some(partition)) = (
        event_ids,
        row.try_get::<Option<i64>, _>(6)?,
        row.try_get::<Option<i64>, _>(7)?,
        row.try_get::<Option<i32>, _>(8)?,
    ) else {
        return Err(StoreError::Corrupt(format!(
            "command {command_id} names versions with no events"
        )));
    };
    if written != last_version - first_version + 1 {
        return Err(StoreError::Corrupt(format!(
            "command {command_id} names {first_version}..={last_version} but {written} events exist"
        )));
    }
    Ok(Some((
        hash,
        Some(Appended {
            stream_id: row.try_get(2)?,
            first_version,
            last_version,
            commit: CommitToken {
                position: Position { tx, pos },
                partition,
            },
            event_ids,
            replayed: true,
        }),
    )))
}

/// One statement: read and check the stream's version, insert the events, record the command
/// with the versions it wrote. The version is read in the same snapshot that inserts; two
/// writers that both pass the check collide on UNIQUE (stream_id, stream_version) and the loser
/// gets a conflict; an expected version ahead of the stream matches no row. Returns the stream's
/// version before the append and one row per event written (none: a conflict).
const APPEND_SQL: &str = "\
WITH cur AS (
    SELECT coalesce(max(stream_version), 0) AS v FROM es.events WHERE stream_id = $1
), ok AS (
    SELECT v FROM cur WHERE $8::bigint IS NULL OR v = $8
), ins AS (
    INSERT INTO es.events (event_id, stream_id, stream_version, partition, event_type, schema_version, payload, metadata)
    SELECT e.event_id, $1, ok.v + e.ord, $2, e.event_type, e.schema_version, e.payload, $3
    FROM ok, unnest($4::uuid[], $5::text[], $6::int[], $7::jsonb[]) WITH ORDINALITY
         AS e(event_id, event_type, schema_version, payload, ord)
    RETURNING stream_version, global_position, transaction_id
), cmd AS (
    INSERT INTO es.commands (command_id, request_hash, stream_id, first_version, last_version)
    SELECT $9, $10, $1, v + 1, v + cardinality($4::uuid[]) FROM ok WHERE $9::text IS NOT NULL
)
SELECT stream_version, global_position, transaction_id::text::bigint FROM ins";

async fn insert_events(
    conn: &mut PgConnection,
    stream_id: &str,
    partitions: i32,
    expected: ExpectedVersion,
    events: &[NewEvent],
    metadata: &Metadata,
    command: Option<&CommandRecord>,
) -> Result<Appended, StoreError> {
    let partition = partition_of(stream_id, partitions);
    let expected_version = match expected {
        ExpectedVersion::Any => None,
        ExpectedVersion::Exact(v) => Some(v),
    };
    let rows = sqlx::query(APPEND_SQL)
        .bind(stream_id)
        .bind(partition)
        .bind(sqlx::types::Json(metadata))
        .bind(events.iter().map(|e| e.event_id).collect::<Vec<_>>())
        .bind(
            events
                .iter()
                .map(|e| e.event_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(events.iter().map(|e| e.schema_version).collect::<Vec<_>>())
        .bind(events.iter().map(|e| &e.payload).collect::<Vec<_>>())
        .bind(expected_version)
        .bind(command.map(|c| c.command_id.as_str()))
        .bind(command.map(|c| c.request_hash.as_slice()))
        .fetch_all(conn)
        .await
        .map_err(|e| classify(e, stream_id, expected))?;
    // Rows come back in insertion order; pick the last version explicitly all the same.
    let mut first_version = i64::MAX;
    let mut last: Option<(i64, i64, i64)> = None;
    for row in &rows {
        let (v, pos, tx): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        first_version = first_version.min(v);
        if last.is_none_or(|(lv, _, _)| v > lv) {
            last = Some((v, pos, tx));
        }
    }
    let Some((last_version, last_pos, last_tx)) = last else {
        return Err(StoreError::Conflict {
            stream_id: stream_id.to_owned(),
            expected,
        });
    };
    Ok(Appended {
        stream_id: stream_id.to_owned(),
        first_version,
        last_version,
        commit: CommitToken {
            position: Position {
                tx: last_tx,
                pos: last_pos,
            },
            partition,
        },
        event_ids: events.iter().map(|e| e.event_id).collect(),
        replayed: false,
    })
}

pub(crate) fn classify(e: sqlx::Error, stream_id: &str, expected: ExpectedVersion) -> StoreError {
    if let Some(db) = e.as_database_error()
        && db.is_unique_violation()
    {
        return match db.constraint() {
            Some("events_event_id_key") => StoreError::DuplicateEvent,
            Some("commands_pkey") => StoreError::CommandExists,
            _ => StoreError::Conflict {
                stream_id: stream_id.to_owned(),
                expected,
            },
        };
    }
    StoreError::Database(e)
}

fn decode_event(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let metadata: sqlx::types::Json<Metadata> = row
        .try_get("metadata")
        .map_err(|e| StoreError::Corrupt(format!("metadata: {e}")))?;
    Ok(RecordedEvent {
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get("stream_version")?,
        global_position: row.try_get("global_position")?,
        transaction_id: row.try_get("transaction_id")?,
        partition: row.try_get("partition")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        metadata: metadata.0,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// A page of the log read by [`EventStore::read_all_raw`]: the rows as Postgres sent them, in
/// commit order. [`RawPage::events`] views them without copying their text.
#[derive(Debug)]
pub struct RawPage {
    rows: Vec<PgRow>,
}

impl RawPage {
    /// Number of events in the page.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the page holds no event (nothing readable after the position asked for).
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The page's events in commit order, borrowing their text from the page.
    pub fn events(&self) -> Result<Vec<RawEvent<'_>>, StoreError> {
        // Every row of a page comes from one statement: its column types are checked once, on
        // the first row, instead of once per value.
        if let Some(first) = self.rows.first() {
            check_raw_columns(first)?;
        }
        self.rows.iter().map(decode_raw_event).collect()
    }
}

/// Fails unless `row`'s columns have the types [`decode_raw_event`] decodes.
fn check_raw_columns(row: &PgRow) -> Result<(), StoreError> {
    use sqlx::{Column, Postgres, Type};
    fn check<T: Type<Postgres>>(row: &PgRow, i: usize) -> Result<(), StoreError> {
        let ty = row.try_column(i)?.type_info();
        if T::compatible(ty) {
            Ok(())
        } else {
            Err(StoreError::Corrupt(format!(
                "log column {i} is {ty}, expected {}",
                T::type_info()
            )))
        }
    }
    check::<Uuid>(row, 0)?;
    check::<&str>(row, 1)?;
    check::<i64>(row, 2)?;
    check::<i64>(row, 3)?;
    check::<i64>(row, 4)?;
    check::<i32>(row, 5)?;
    check::<&str>(row, 6)?;
    check::<i32>(row, 7)?;
    check::<&str>(row, 8)?;
    check::<&str>(row, 9)?;
    check::<chrono::DateTime<chrono::Utc>>(row, 10)?;
    check::<&str>(row, 11)
}

/// Decodes a row of [`RAW_EVENT_COLUMNS`] whose column types [`check_raw_columns`] accepted.
fn decode_raw_event(row: &PgRow) -> Result<RawEvent<'_>, StoreError> {
    Ok(RawEvent {
        event_id: row.try_get_unchecked(0)?,
        stream_id: row.try_get_unchecked(1)?,
        stream_version: row.try_get_unchecked(2)?,
        global_position: row.try_get_unchecked(3)?,
        transaction_id: row.try_get_unchecked(4)?,
        partition: row.try_get_unchecked(5)?,
        event_type: row.try_get_unchecked(6)?,
        schema_version: row.try_get_unchecked(7)?,
        payload: row.try_get_unchecked(8)?,
        metadata: row.try_get_unchecked(9)?,
        recorded_at: row.try_get_unchecked(10)?,
        tenant_id: row.try_get_unchecked(11)?,
    })
}
