//! The projector runtime: per-partition pull consumers, ownership, and the batch step.

use crate::api_keys::ApiKeys;
use crate::conversations::Conversations;
use crate::dead_letters;
use crate::projection::{Gate, Gated, Projection};
use anyhow::Context as _;
use async_nats::jetstream::consumer::pull::{self, Batch};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use nura_nats::{Delivered, Topology};
use nura_store::{CheckpointBoard, EventStore, Position, RecordedEvent, StoreError};
use sqlx::{Connection, PgConnection, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long an instance that did not get a partition waits before trying again.
const STANDBY_RETRY: Duration = Duration::from_secs(2);
/// How often an owner checks that its lock connection (hence its ownership) is still alive.
const OWNERSHIP_CHECK: Duration = Duration::from_secs(5);
/// How often an idle worker checks that its consumer still exists (the stream may have been
/// deleted and recreated, which silently orphans a consumer handle).
const CONSUMER_CHECK: Duration = Duration::from_secs(10);
/// Longest a checkpoint moved only by batches of other aggregates' events stays unwritten while
/// such batches keep coming (it is written at once when the partition goes idle or another kind
/// of batch arrives).
const FOREIGN_WRITE_EVERY: Duration = Duration::from_millis(100);

/// Tuning of a projector. `Default` gives production values.
#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Most messages fetched and applied in one transaction (512). A new consumer may have four
    /// batches unacknowledged (`max_ack_pending`), room for the batch being applied and the one
    /// prefetched meanwhile.
    pub batch_size: usize,
    /// Deliveries of a failing event before it becomes a dead letter (5).
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt (500 ms).
    pub backoff_base: Duration,
    /// Longest backoff (30 s).
    pub backoff_max: Duration,
    /// JetStream redelivers a message not acked within this (30 s).
    pub ack_wait: Duration,
    /// How long a fetch waits for messages when the partition is idle (1 s).
    pub idle_fetch_wait: Duration,
    /// Where each committed checkpoint is posted, for read-your-writes waiters in this process
    /// (none).
    pub checkpoint_board: Option<CheckpointBoard>,
    /// Most events of a hole in the JetStream chain read from Postgres at once (1,000): a hole
    /// is applied in the transaction of the message that revealed it, a page at a time.
    pub fill_page: usize,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            batch_size: 512,
            max_attempts: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ack_wait: Duration::from_secs(30),
            idle_fetch_wait: Duration::from_secs(1),
            checkpoint_board: None,
            fill_page: 1000,
        }
    }
}

impl ProjectorConfig {
    /// The delay before delivery `attempt + 1`: `base * 2^(attempt-1)`, capped at `backoff_max`,
    /// minus up to a quarter of jitter so failing messages of many partitions do not return in
    /// lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        let raw = self.backoff_base.saturating_mul(1u32 << exp);
        let capped = raw.min(self.backoff_max);
        // Jitter from a random UUID: no extra dependency for one number.
        let r = uuid::Uuid::new_v4().as_u128() as u16;
        let jitter = capped.mul_f64(f64::from(r) / f64::from(u16::MAX) / 4.0);
        capped.saturating_sub(jitter)
    }
}

/// Why a batch step failed. Nothing was committed for the messages of a failed step; they are
/// redelivered.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// JetStream failed (unreachable, stream or consumer gone).
    #[error("jetstream: {0}")]
    Nats(String),
    /// Postgres failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Reading the event store failed.
    #[error("event store: {0}")]
    Store(#[from] StoreError),
}

/// What one batch step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Messages fetched.
    pub fetched: usize,
    /// Events applied to the read model (including events loaded to fill holes).
    pub applied: usize,
    /// Messages at or below the checkpoint (redeliveries, duplicates, already filled).
    pub skipped: usize,
    /// Events loaded from Postgres because JetStream did not deliver them in chain order.
    pub holes_filled: usize,
    /// Events that exhausted their attempts and became dead letters.
    pub dead_lettered: usize,
    /// Events parked behind an open dead letter of their stream.
    pub parked: usize,
    /// Messages negatively acknowledged (a failing event and the rest of its batch).
    pub nacked: usize,
    /// Messages that could not be decoded or name no event of the store (terminated; a real
    /// event among them is refilled from Postgres through the chain).
    pub undecodable: usize,
    /// Batches written by one gated statement, without a transaction (see [`Gate`]).
    pub gated: usize,
}

impl BatchOutcome {
    /// Adds what another projection made of the same batch: `fetched` counts the messages once,
    /// `undecodable` counts messages (every projection finds the same ones), the rest add up.
    fn absorb(&mut self, other: BatchOutcome) {
        self.applied += other.applied;
        self.skipped += other.skipped;
        self.holes_filled += other.holes_filled;
        self.dead_lettered += other.dead_lettered;
        self.parked += other.parked;
        self.undecodable = self.undecodable.max(other.undecodable);
        self.gated += other.gated;
    }
}

/// One partition's durable consumer and the batch step of the projections that read it. Each
/// fetched batch is applied by every projection (concurrently, each with its own checkpoint,
/// path and dead letters), then acknowledged once: so a group of projections costs one
/// delivery per event, not one per projection. Ownership (which instance runs it) is decided
/// outside, by [`run`] or [`run_projection`]; the step itself is safe to run from several
/// instances at once, because the checkpoint row lock serializes their transactions and
/// everything at or below a checkpoint is skipped.
pub struct PartitionWorker {
    shared: Shared,
    js: jetstream::Context,
    topology: Topology,
    /// Names the consumer and the ownership lock: the projection's own name, or the group's.
    name: String,
    projectors: Vec<Projector>,
    consumer: Option<PullConsumer>,
    /// Whether the consumer acks cumulatively (`AckPolicy::All`, how this runtime creates
    /// consumers) rather than message by message (`Explicit`, consumers created before).
    ack_all: bool,
    consumer_checked: Instant,
    /// The next batch, requested while the previous one was applied, and its requested size.
    prefetched: Option<(Batch, usize)>,
    /// The projections were found at or past the partition's last message in the stream since
    /// the worker started, last failed, or last released the partition (see
    /// [`PartitionWorker::catch_up_with_stream`]).
    tail_checked: bool,
    /// Catch-up attempts that ended with an event to retry: they count as that event's
    /// deliveries, so an event that keeps failing is dead-lettered as a delivered one would be.
    tail_attempts: i64,
}

/// What every projection of a worker reads while it applies a batch.
struct Shared {
    store: EventStore,
    config: ProjectorConfig,
    partition: i32,
}

/// One projection on the worker's partition.
struct Projector {
    projection: Arc<dyn Projection>,
    /// The checkpoint as this projector last wrote or read it (`None`: unknown).
    written: Option<Position>,
    /// Where batches of other aggregates' events moved the checkpoint since `written`, and since
    /// when: not written yet (see [`Projector::pass_foreign_batch`]).
    unwritten: Option<(Position, Instant)>,
}

/// What one projection made of a batch it committed: its outcome and its answer to each message.
struct Applied {
    outcome: BatchOutcome,
    answers: Vec<AckKind>,
}

impl Applied {
    /// Every message acked.
    fn all_acked(outcome: BatchOutcome) -> Applied {
        Applied {
            answers: vec![AckKind::Ack; outcome.fetched],
            outcome,
        }
    }
}

/// The answer to a message two projections answered `a` and `b`: a nak (the longer delay) over
/// a termination over an ack, so an event one projection must retry is never acked.
fn stronger(a: AckKind, b: AckKind) -> AckKind {
    match (a, b) {
        (AckKind::Nak(x), AckKind::Nak(y)) => AckKind::Nak(x.max(y)),
        (n @ AckKind::Nak(_), _) | (_, n @ AckKind::Nak(_)) => n,
        (AckKind::Term, _) | (_, AckKind::Term) => AckKind::Term,
        (a, _) => a,
    }
}

impl PartitionWorker {
    /// A worker for `projection` alone on `partition`, with a consumer of its own
    /// (`<projection>_p<partition>`); the consumer is created on the first step.
    pub fn new(
        store: EventStore,
        js: jetstream::Context,
        topology: Topology,
        config: ProjectorConfig,
        projection: Arc<dyn Projection>,
        partition: i32,
    ) -> Self {
        let name = projection.name().to_owned();
        Self::shared_by(store, js, topology, config, &name, &[projection], partition)
    }

    /// A worker whose `projections` share one consumer on `partition`, named
    /// `<name>_p<partition>` (`name`: letters, digits, `_` and `-`); the consumer is created on
    /// the first step.
    pub fn shared_by(
        store: EventStore,
        js: jetstream::Context,
        topology: Topology,
        config: ProjectorConfig,
        name: &str,
        projections: &[Arc<dyn Projection>],
        partition: i32,
    ) -> Self {
        PartitionWorker {
            shared: Shared {
                store,
                config,
                partition,
            },
            js,
            topology,
            name: name.to_owned(),
            projectors: projections
                .iter()
                .map(|projection| Projector {
                    projection: projection.clone(),
                    written: None,
                    unwritten: None,
                })
                .collect(),
            consumer: None,
            ack_all: false,
            consumer_checked: Instant::now(),
            prefetched: None,
            tail_checked: false,
            tail_attempts: 0,
        }
    }

    /// The durable consumer's name: `<name>_p<partition>`.
    pub fn consumer_name(&self) -> String {
        format!("{}_p{}", self.name, self.shared.partition)
    }

    /// The partition this worker projects.
    pub fn partition(&self) -> i32 {
        self.shared.partition
    }

    /// Gets or creates the stream and this worker's durable consumer. A new consumer acks
    /// cumulatively (`AckPolicy::All`): one ack per committed batch instead of one per message.
    /// An existing consumer keeps the ack policy it was created with (JetStream cannot change it)
    /// and is acked accordingly. A new consumer of a group starts where the projections' own
    /// consumers left off, if they all exist (see [`Self::start_after_predecessors`]).
    pub async fn consumer(&mut self) -> Result<PullConsumer, WorkerError> {
        if let Some(c) = &self.consumer {
            return Ok(c.clone());
        }
        let stream = self
            .topology
            .ensure_stream(&self.js)
            .await
            .map_err(|e| WorkerError::Nats(format!("ensure stream: {e:#}")))?;
        let name = self.consumer_name();
        let deliver_policy = match stream.consumer_info(&name).await {
            // It exists: its own configuration wins below.
            Ok(_) => DeliverPolicy::All,
            Err(_) => self.start_after_predecessors(&stream).await,
        };
        let config = &self.shared.config;
        let consumer: PullConsumer = stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    deliver_policy,
                    ack_policy: AckPolicy::All,
                    max_ack_pending: i64::try_from(config.batch_size.saturating_mul(4))
                        .unwrap_or(i64::MAX),
                    ack_wait: config.ack_wait,
                    // Unlimited: the runtime counts attempts itself and dead-letters.
                    max_deliver: -1,
                    filter_subject: self.topology.partition_filter(self.shared.partition),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| WorkerError::Nats(format!("consumer {name}: {e}")))?;
        self.ack_all = consumer.cached_info().config.ack_policy == AckPolicy::All;
        self.consumer = Some(consumer.clone());
        self.consumer_checked = Instant::now();
        Ok(consumer)
    }

    /// Where a new consumer shared by several projections starts: right after the last message
    /// that every projection's own consumer (`<projection>_p<partition>`, as each projection had
    /// before they shared one) acknowledged, so taking over from them does not deliver the whole
    /// stream again. From the start of the stream when any of them is missing. Either start is
    /// exact: messages at or below a projection's checkpoint are skipped, and a start past an
    /// event some projection has not applied breaks its `Nura-Prev` chain, which is then filled
    /// from Postgres. The old consumers are left alone (an instance of an older version may
    /// still read them); they can be deleted once every instance shares consumers.
    async fn start_after_predecessors(&self, stream: &jetstream::stream::Stream) -> DeliverPolicy {
        let mut acked: Option<u64> = None;
        for p in &self.projectors {
            let own = format!("{}_p{}", p.projection.name(), self.shared.partition);
            if own == self.consumer_name() {
                return DeliverPolicy::All;
            }
            match stream.consumer_info(&own).await {
                Ok(info) => {
                    let floor = info.ack_floor.stream_sequence;
                    acked = Some(acked.map_or(floor, |a| a.min(floor)));
                }
                Err(_) => return DeliverPolicy::All,
            }
        }
        match acked {
            Some(floor) if floor > 0 => {
                tracing::info!(
                    consumer = %self.consumer_name(), start_sequence = floor + 1,
                    "new shared consumer starts after what the projections' own consumers acknowledged"
                );
                DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                }
            }
            _ => DeliverPolicy::All,
        }
    }

    /// One step: take the next batch of up to `batch_size` messages (waiting up to
    /// `idle_fetch_wait` when the partition is idle), have every projection apply it (each
    /// commits its rows with its checkpoint), then acknowledge it. See the crate docs for the
    /// skip / hole-fill / dead-letter rules. While a full batch is applied the next one is
    /// already requested, so its messages travel meanwhile; [`PartitionWorker::release`] hands
    /// such a prefetched batch back.
    pub async fn process_batch(&mut self) -> Result<BatchOutcome, WorkerError> {
        let result = self.step().await;
        if result.is_err() {
            // The failure may have been Postgres going away (restored, or crashed with commits
            // it had not flushed): look at the stream's tail again once the partition is idle.
            self.tail_checked = false;
        }
        result
    }

    async fn step(&mut self) -> Result<BatchOutcome, WorkerError> {
        let started = Instant::now();
        let msgs = self.receive().await?;
        let received = started.elapsed();
        if msgs.is_empty() {
            for p in &mut self.projectors {
                p.write_foreign_progress(&self.shared).await?;
            }
            self.check_consumer().await;
            if !self.tail_checked {
                let (caught_up, outcome) = self.catch_up_with_stream().await?;
                self.tail_checked = caught_up;
                return Ok(outcome);
            }
            return Ok(BatchOutcome::default());
        }
        let pending = msgs.last().and_then(|m| m.info().ok()).map(|i| i.pending);
        let shared = &self.shared;
        let chain = Chain::of(shared.partition, &msgs);
        let results = futures::future::join_all(
            self.projectors
                .iter_mut()
                .map(|p| p.apply(shared, &msgs, chain.as_ref(), pending)),
        )
        .await;
        let mut outcome = BatchOutcome {
            fetched: msgs.len(),
            ..Default::default()
        };
        let mut answers = vec![AckKind::Ack; msgs.len()];
        let mut failure = None;
        for result in results {
            match result {
                Ok(applied) => {
                    outcome.absorb(applied.outcome);
                    for (answer, other) in answers.iter_mut().zip(applied.answers) {
                        *answer = stronger(*answer, other);
                    }
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            // That projection committed nothing: bring the batch back soon rather than after
            // ack_wait (the projections that did commit skip it then).
            let delay = self.shared.config.backoff(1);
            for m in &msgs {
                let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
            }
            return Err(e);
        }
        // Acks only after every commit: a crash in between means redelivery, which is skipped.
        outcome.nacked = answers
            .iter()
            .filter(|a| matches!(a, AckKind::Nak(_)))
            .count();
        let applied = started.elapsed();
        self.acknowledge(&msgs, &answers).await;
        tracing::debug!(
            partition = self.shared.partition, messages = msgs.len(), received_in = ?received,
            applied_in = ?(applied - received), acked_in = ?(started.elapsed() - applied), "step"
        );
        Ok(outcome)
    }

    /// The messages of the next batch: the prefetched one if there is one, else a new fetch.
    /// After a full batch it requests the following one, so that one's messages arrive while
    /// this one is applied (a backlog drains without waiting for a fetch per batch). After a
    /// partial one (the partition is caught up) it does not: a request pending during the apply
    /// would be answered by the first message to arrive, while a request made after it takes
    /// every message that arrived meanwhile, so steady traffic comes in fewer, larger batches.
    /// Never more than one request ahead: each fetch has an inbox of its own, and a server that
    /// spreads a backlog's messages over the waiting requests in turn would leave each of two
    /// outstanding requests with every other message, batches that do not continue the chain.
    /// Tried with three requests ahead (nats-server 2.9): the projectors drained the benchmark's
    /// backlog at half the rate (17k against 33k events/s), their batches' p90 apply time 390 ms
    /// against 41 ms.
    async fn receive(&mut self) -> Result<Vec<jetstream::Message>, WorkerError> {
        let consumer = self.consumer().await?;
        let (mut batch, requested) = match self.prefetched.take() {
            Some(b) => b,
            None => self.request(&consumer, 0).await?,
        };
        let mut msgs = Vec::new();
        while let Some(m) = batch.next().await {
            match m {
                Ok(m) => msgs.push(m),
                Err(e) => {
                    // Process what arrived; the consumer is re-fetched next step.
                    tracing::warn!(partition = self.shared.partition, error = %e, "fetch interrupted");
                    self.consumer = None;
                    break;
                }
            }
        }
        if msgs.len() >= requested && self.consumer.is_some() {
            // A failed request only costs the overlap: the next step fetches again.
            self.prefetched = match self.room(&consumer, msgs.len()) {
                0 => None,
                _ => self.request(&consumer, msgs.len()).await.ok(),
            };
        }
        Ok(msgs)
    }

    /// How many messages a request may ask for while `unacked` are outstanding: `batch_size`,
    /// or fewer so as not to exceed the consumer's `max_ack_pending` (the server refuses a
    /// request beyond it).
    fn room(&self, consumer: &PullConsumer, unacked: usize) -> usize {
        let batch_size = self.shared.config.batch_size;
        match usize::try_from(consumer.cached_info().config.max_ack_pending) {
            Ok(limit) if limit > 0 => batch_size.min(limit.saturating_sub(unacked)),
            _ => batch_size,
        }
    }

    /// Requests the next batch while `unacked` messages are outstanding (see [`Self::room`]);
    /// returns it with the number of messages requested.
    async fn request(
        &mut self,
        consumer: &PullConsumer,
        unacked: usize,
    ) -> Result<(Batch, usize), WorkerError> {
        let requested = self.room(consumer, unacked).max(1);
        let batch = consumer
            .fetch()
            .max_messages(requested)
            .expires(self.shared.config.idle_fetch_wait)
            .messages()
            .await
            .map_err(|e| {
                self.consumer = None;
                WorkerError::Nats(format!("fetch: {e}"))
            })?;
        Ok((batch, requested))
    }

    /// Hands back a prefetched batch (call it when this instance stops projecting the
    /// partition): its messages are nacked without delay so whoever projects the partition next
    /// gets them at once instead of after `ack_wait`. Waits at most for the fetch to expire.
    pub async fn release(&mut self) {
        self.tail_checked = false;
        for p in &mut self.projectors {
            if let Err(e) = p.write_foreign_progress(&self.shared).await {
                tracing::warn!(
                    projector = p.projection.name(), partition = self.shared.partition, error = %e,
                    "could not write the checkpoint on release"
                );
            }
        }
        let Some((mut batch, _)) = self.prefetched.take() else {
            return;
        };
        while let Some(Ok(m)) = batch.next().await {
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Brings every projection up to the partition's last message in the stream, from Postgres,
    /// when its checkpoint is behind it; run when the partition is idle, once after the worker
    /// starts, fails or takes the partition over. A checkpoint behind a message no consumer will
    /// deliver again means the message was acked without its commit surviving: a cumulative ack
    /// covered a message another owner held, a worker died holding in-memory progress over other
    /// aggregates' events, the read-model database was restored from a backup, or the server
    /// runs with `synchronous_commit = off` and crashed. Any later message of the partition
    /// refills such a gap through its `Nura-Prev` link; on a partition that stays quiet this
    /// does, instead of leaving the read model (and readers waiting on a commit token) behind
    /// until its next event. Returns whether every projection is now at or past that message,
    /// and what was applied.
    async fn catch_up_with_stream(&mut self) -> Result<(bool, BatchOutcome), WorkerError> {
        let partition = self.shared.partition;
        let filter = self.topology.partition_filter(partition);
        let stream = self
            .js
            .get_stream_no_info(&self.topology.stream)
            .await
            .map_err(|e| WorkerError::Nats(format!("stream {}: {e}", self.topology.stream)))?;
        let last = match stream.get_last_raw_message_by_subject(&filter).await {
            Ok(m) => m,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok((true, BatchOutcome::default()));
            }
            Err(e) => return Err(WorkerError::Nats(format!("last message of {filter}: {e}"))),
        };
        self.tail_attempts += 1;
        let last = [Incoming {
            delivered: decode_ours(&self.shared, Some(&last.headers), &last.payload),
            attempts: self.tail_attempts,
        }];
        let mut caught_up = true;
        let mut outcome = BatchOutcome::default();
        for p in &mut self.projectors {
            let Some((_, applied)) = p.apply_in_transaction(&self.shared, &last).await? else {
                caught_up = false;
                continue;
            };
            // A failing event is retried at the next idle step (or by the next message); a
            // message that names no event of the store has nothing to catch up to.
            caught_up &= !applied.answers.iter().any(|a| matches!(a, AckKind::Nak(_)));
            if applied.outcome.applied > 0 {
                tracing::warn!(
                    projector = p.projection.name(),
                    partition,
                    applied = applied.outcome.applied,
                    "checkpoint was behind the stream's last message of the partition: \
                     applied the missing events from Postgres"
                );
                metrics::counter!("nura_projector_caught_up_total", "projector" => p.projection.name())
                    .increment(applied.outcome.applied as u64);
            }
            // The stream's last message was read, not delivered: it counts as neither a skipped
            // nor an undecodable delivery.
            outcome.absorb(BatchOutcome {
                skipped: 0,
                undecodable: 0,
                ..applied.outcome
            });
        }
        if caught_up {
            self.tail_attempts = 0;
        }
        Ok((caught_up, outcome))
    }

    async fn check_consumer(&mut self) {
        if self.consumer_checked.elapsed() < CONSUMER_CHECK {
            return;
        }
        self.consumer_checked = Instant::now();
        let name = self.consumer_name();
        let exists = match self.js.get_stream_no_info(&self.topology.stream).await {
            Ok(s) => s.consumer_info(&name).await.is_ok(),
            Err(_) => false,
        };
        if !exists {
            tracing::warn!(consumer = %name, "consumer or stream vanished; recreating");
            self.consumer = None;
            self.prefetched = None;
        }
    }

    /// Answers JetStream for the messages of a committed batch, message `i` with `answers[i]`.
    /// When every answer is a plain ack and the consumer acks cumulatively, one ack of the
    /// message of highest stream sequence acks them all. It also acks any earlier message of the
    /// consumer still out elsewhere (held by another owner, or a chaos client): in the normal
    /// case its event is at or below the checkpoints just committed; if not (a message
    /// republished after a loss overtook it), its event is refilled from Postgres through the
    /// `Nura-Prev` chain when the partition's next message arrives, or by
    /// [`PartitionWorker::catch_up_with_stream`] at the next owner's first idle step: late,
    /// never lost. A
    /// batch with a nak or a termination is answered message by message, so an event to retry is
    /// never acked (a projection naks a failing message and every one after it).
    async fn acknowledge(&self, msgs: &[jetstream::Message], answers: &[AckKind]) {
        let all_acks = answers.iter().all(|k| matches!(k, AckKind::Ack));
        let highest = || {
            msgs.iter()
                .map(|m| m.info().map(|i| i.stream_sequence).ok().map(|s| (s, m)))
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .max_by_key(|(s, _)| *s)
                .map(|(_, m)| m)
        };
        let answers: Vec<(&jetstream::Message, AckKind)> =
            match (self.ack_all && all_acks).then(highest).flatten() {
                Some(last) => vec![(last, AckKind::Ack)],
                None => msgs.iter().zip(answers.iter().copied()).collect(),
            };
        for (msg, kind) in answers {
            if let Err(e) = msg.ack_with(kind).await {
                tracing::warn!(partition = self.shared.partition, error = %e, "ack failed; the message will be redelivered and skipped");
            }
        }
    }
}

impl Projector {
    /// Applies a batch by the cheapest path that can take it: a batch of other aggregates'
    /// events moves the checkpoint alone; a clean chain goes through the projection's gated
    /// statement; anything else (or a refusal) gets the transaction, and a batch refused there
    /// is redone event by event. Commits, but does not acknowledge: the worker answers once
    /// every projection of the batch has committed.
    /// The path is counted in `nura_projector_batches_total{path}`: `foreign`, `gated`,
    /// `transaction`, `careful`.
    async fn apply(
        &mut self,
        shared: &Shared,
        msgs: &[jetstream::Message],
        chain: Option<&Chain<'_>>,
        pending: Option<u64>,
    ) -> Result<Applied, WorkerError> {
        let started = Instant::now();
        let result = self.apply_by_path(shared, msgs, chain).await;
        let name = self.projection.name();
        tracing::debug!(
            projector = name, partition = shared.partition, messages = msgs.len(),
            applied_in = ?started.elapsed(), "batch"
        );
        let labels = [
            ("projector", name.to_string()),
            ("partition", shared.partition.to_string()),
        ];
        metrics::histogram!("nura_projector_batch_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        if let Some(pending) = pending {
            metrics::gauge!("nura_projector_pending_messages", &labels).set(pending as f64);
        }
        let (path, applied) = result?;
        metrics::counter!("nura_projector_batches_total", "projector" => name, "path" => path)
            .increment(1);
        let o = &applied.outcome;
        metrics::counter!("nura_projector_applied_total", &labels).increment(o.applied as u64);
        metrics::counter!("nura_projector_skipped_total", &labels).increment(o.skipped as u64);
        metrics::counter!("nura_projector_holes_filled_total", &labels)
            .increment(o.holes_filled as u64);
        Ok(applied)
    }

    async fn apply_by_path(
        &mut self,
        shared: &Shared,
        msgs: &[jetstream::Message],
        chain: Option<&Chain<'_>>,
    ) -> Result<(&'static str, Applied), WorkerError> {
        let foreign = self.pass_foreign_batch(shared, chain).await?;
        if let Some(a) = foreign {
            return Ok(("foreign", a));
        }
        // Every other path reads the checkpoint from the table.
        self.write_foreign_progress(shared).await?;
        if let Some(a) = self.apply_gated(shared, msgs, chain).await? {
            return Ok(("gated", a));
        }
        self.apply_in_transaction(shared, &incoming(shared, msgs))
            .await?
            .ok_or_else(|| WorkerError::Nats("careful batch gave up".into()))
    }

    /// The transactional path: the batch in one transaction, or, when it is refused there,
    /// event by event (`careful`). `None` when even that gave up.
    async fn apply_in_transaction(
        &mut self,
        shared: &Shared,
        msgs: &[Incoming],
    ) -> Result<Option<(&'static str, Applied)>, WorkerError> {
        if let Some(a) = self.apply_batch(shared, msgs, false).await? {
            return Ok(Some(("transaction", a)));
        }
        Ok(self
            .apply_batch(shared, msgs, true)
            .await?
            .map(|a| ("careful", a)))
    }

    /// A batch that continues the checkpoint's chain, as one autocommit statement (rows and
    /// checkpoint together, see [`Gate`]), when the projection has such a form and its gate
    /// passes. `None` sends the batch to the transactional path, which decides every case this
    /// one leaves out (redeliveries, holes, dead letters, undecodable messages, failures).
    async fn apply_gated(
        &mut self,
        shared: &Shared,
        msgs: &[jetstream::Message],
        chain: Option<&Chain<'_>>,
    ) -> Result<Option<Applied>, WorkerError> {
        let Some(chain) = chain else {
            return Ok(None);
        };
        let mut streams = chain.streams.clone();
        streams.sort_unstable();
        streams.dedup();
        let streams = streams.into_iter().map(str::to_owned).collect();
        let mut events = Vec::with_capacity(msgs.len());
        for m in msgs {
            match nura_nats::decode(m.headers.as_ref(), &m.payload) {
                Ok(d) if d.event.partition == shared.partition => events.push(d.event),
                _ => return Ok(None),
            }
        }
        let gate = Gate {
            projector: self.projection.name(),
            partition: shared.partition,
            from: chain.from,
            to: chain.to,
            streams,
        };
        let mut conn = shared.store.pool().acquire().await?;
        match self
            .projection
            .apply_batch_gated(&mut conn, &events, &gate)
            .await
        {
            Ok(Gated::Applied) => {}
            Ok(Gated::Refused | Gated::Unsupported) => return Ok(None),
            Err(e) => {
                tracing::debug!(
                    projector = gate.projector, partition = shared.partition, error = %e,
                    "gated batch failed; applying it in a transaction"
                );
                return Ok(None);
            }
        }
        drop(conn);
        self.written = Some(chain.to);
        self.posted(shared, chain.to);
        Ok(Some(Applied::all_acked(BatchOutcome {
            fetched: msgs.len(),
            applied: msgs.len(),
            gated: 1,
            ..Default::default()
        })))
    }

    /// A batch made only of events of streams the projection does not read (another aggregate's)
    /// changes no rows. When it also continues the checkpoint's chain — each message's
    /// `Nura-Prev` is the previous message's position, and the first one's is the checkpoint — the
    /// checkpoint moves past it without a transaction and the messages are acked. Read from the
    /// headers only. Streams the projection does not read are never parked behind its dead
    /// letters, since it never fails on them.
    ///
    /// Such batches are most of a projection's traffic when it reads one aggregate among many,
    /// so when the chain continues the checkpoint this worker wrote, the move stays in memory
    /// and is written at most every [`FOREIGN_WRITE_EVERY`], when the partition goes idle, or
    /// before any other kind of batch. If the process dies first, the table's checkpoint is
    /// behind the acked messages; the next owner's first message then breaks the chain from the
    /// table, and the hole is filled from Postgres: events that change no rows, read again.
    ///
    /// `None` when the batch does not qualify or the checkpoint is elsewhere (a redelivery, a
    /// hole, another owner's progress, no row yet): the other paths decide those.
    async fn pass_foreign_batch(
        &mut self,
        shared: &Shared,
        chain: Option<&Chain<'_>>,
    ) -> Result<Option<Applied>, WorkerError> {
        let Some(&Chain {
            from,
            to,
            ref streams,
        }) = chain
        else {
            return Ok(None);
        };
        if streams.iter().any(|s| self.projection.reads_stream(s)) {
            return Ok(None);
        }
        let current = self.unwritten.map(|(p, _)| p).or(self.written);
        if current == Some(from) {
            let since = self.unwritten.map_or_else(Instant::now, |(_, since)| since);
            self.unwritten = Some((to, since));
            if since.elapsed() >= FOREIGN_WRITE_EVERY {
                self.write_foreign_progress(shared).await?;
            }
        } else {
            self.write_foreign_progress(shared).await?;
            if !self.move_checkpoint(shared, from, to).await? {
                return Ok(None);
            }
        }
        self.posted(shared, to);
        Ok(Some(Applied::all_acked(BatchOutcome {
            fetched: streams.len(),
            applied: streams.len(),
            ..Default::default()
        })))
    }

    /// Writes the checkpoint that batches of other aggregates' events moved in memory, if any.
    /// If the table's checkpoint is no longer the one this worker wrote (another owner moved
    /// it), the in-memory progress is dropped: that owner's chain covers those events.
    async fn write_foreign_progress(&mut self, shared: &Shared) -> Result<(), WorkerError> {
        let (Some((to, _)), Some(from)) = (self.unwritten, self.written) else {
            return Ok(());
        };
        self.unwritten = None;
        if !self.move_checkpoint(shared, from, to).await? {
            self.written = None;
        }
        Ok(())
    }

    /// Moves the checkpoint from `from` to `to` with one conditional `UPDATE`, without a
    /// transaction; false (nothing changed) when it is not at `from`.
    async fn move_checkpoint(
        &mut self,
        shared: &Shared,
        from: Position,
        to: Position,
    ) -> Result<bool, WorkerError> {
        let moved = sqlx::query(
            "UPDATE read.checkpoints SET transaction_id = $5, global_position = $6, updated_at = now() \
             WHERE projector = $1 AND partition = $2 AND transaction_id = $3 AND global_position = $4",
        )
        .bind(self.projection.name())
        .bind(shared.partition)
        .bind(from.tx)
        .bind(from.pos)
        .bind(to.tx)
        .bind(to.pos)
        .execute(shared.store.pool())
        .await;
        match moved {
            Ok(r) if r.rows_affected() == 1 => {
                self.written = Some(to);
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) => {
                self.written = None;
                Err(e.into())
            }
        }
    }

    /// Applies a batch in one transaction. Without `careful`, the events are applied together by
    /// [`Projection::apply_batch`] and a failure abandons the transaction (`Ok(None)`); with
    /// `careful`, each event runs in a savepoint so a failing one is retried later or
    /// dead-lettered alone.
    async fn apply_batch(
        &mut self,
        shared: &Shared,
        msgs: &[Incoming],
        careful: bool,
    ) -> Result<Option<Applied>, WorkerError> {
        let name = self.projection.name();
        let fill_page = i64::try_from(shared.config.fill_page.max(1)).unwrap_or(i64::MAX);
        let mut outcome = BatchOutcome {
            fetched: msgs.len(),
            ..Default::default()
        };
        let mut tx = shared.store.pool().begin().await?;
        let start = lock_checkpoint(&mut tx, name, shared.partition).await?;
        let mut checkpoint = start;
        let mut parked = dead_letters::open_streams(&mut tx, name, shared.partition).await?;
        // Index of the first message to nak (a failing event with attempts left), and its delay.
        let mut stop: Option<(usize, Duration)> = None;
        // The fast path's events, applied together after the loop.
        let mut pending: Vec<RecordedEvent> = Vec::new();
        // Messages to terminate: undecodable ones now, foreign ones as they are found.
        let mut terminate: Vec<bool> = msgs.iter().map(|m| m.delivered.is_err()).collect();
        'messages: for (i, msg) in msgs.iter().enumerate() {
            let d = match &msg.delivered {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(partition = shared.partition, error = %e, "undecodable message terminated");
                    outcome.undecodable += 1;
                    continue;
                }
            };
            let position = d.event.position();
            if position <= checkpoint {
                outcome.skipped += 1;
                continue;
            }
            let continues = d.prev.unwrap_or(Position::ZERO) == checkpoint;
            if !continues && !self.in_store(shared, &d.event).await? {
                // Not an event of our log (another database publishing on our subjects?):
                // nothing to apply or dead-letter; terminate it so it cannot stall us.
                tracing::error!(
                    partition = shared.partition, event_id = %d.event.event_id,
                    "message names an event that is not in the event store; terminated"
                );
                terminate[i] = true;
                outcome.undecodable += 1;
                continue;
            }
            let attempts = msg.attempts;
            // The message's event alone, or the hole before it and the event, read from Postgres
            // a page at a time after the checkpoint as it moves (a hole of any size never sits in
            // memory at once).
            let mut own = continues.then(|| d.event.clone());
            let (hole_from, mut filled) = (checkpoint, 0);
            loop {
                let (events, last_page) = match own.take() {
                    Some(event) => (vec![event], true),
                    None => {
                        let page = shared
                            .store
                            .read_partition(shared.partition, checkpoint, position, fill_page)
                            .await?;
                        let last_page = page.len() < fill_page as usize
                            || page.last().map(|e| e.event_id) == Some(d.event.event_id);
                        let hole = page
                            .iter()
                            .filter(|e| e.event_id != d.event.event_id)
                            .count();
                        outcome.holes_filled += hole;
                        filled += hole;
                        (page, last_page)
                    }
                };
                for event in events {
                    if let Some(first) = parked.get(&event.stream_id) {
                        let why = format!("parked behind dead letter {first}");
                        dead_letters::record(&mut tx, name, &event, &why, 0).await?;
                        tracing::warn!(event_id = %event.event_id, stream_id = %event.stream_id, "{why}");
                        outcome.parked += 1;
                        checkpoint = event.position();
                        continue;
                    }
                    if !careful {
                        outcome.applied += 1;
                        checkpoint = event.position();
                        pending.push(event);
                        continue;
                    }
                    sqlx::query("SAVEPOINT apply").execute(&mut *tx).await?;
                    match self.projection.apply(&mut tx, &event).await {
                        Ok(()) => {
                            sqlx::query("RELEASE SAVEPOINT apply")
                                .execute(&mut *tx)
                                .await?;
                            outcome.applied += 1;
                            checkpoint = event.position();
                        }
                        Err(e) => {
                            sqlx::query("ROLLBACK TO SAVEPOINT apply")
                                .execute(&mut *tx)
                                .await?;
                            if attempts < i64::from(shared.config.max_attempts) {
                                let delay = shared.config.backoff(attempts as u32);
                                tracing::warn!(
                                    projector = name, event_id = %event.event_id, attempts,
                                    error = %e, retry_in = ?delay, "apply failed; will retry"
                                );
                                stop = Some((i, delay));
                                break 'messages;
                            }
                            let error = e.to_string();
                            let id = dead_letters::record(
                                &mut tx,
                                name,
                                &event,
                                &error,
                                attempts as i32,
                            )
                            .await?;
                            tracing::error!(
                                projector = name, dead_letter = id, event_id = %event.event_id,
                                stream_id = %event.stream_id, attempts, %error,
                                "event dead-lettered after its attempts; its stream is parked"
                            );
                            metrics::counter!("nura_projector_dead_letters_total", "projector" => name)
                            .increment(1);
                            parked.insert(event.stream_id.clone(), id);
                            outcome.dead_lettered += 1;
                            checkpoint = event.position();
                        }
                    }
                }
                if last_page {
                    break;
                }
                // The fast path applies what it gathered before the next page is read.
                if !careful && !self.apply_pending(shared, &mut tx, &mut pending).await {
                    return Ok(None);
                }
            }
            if filled > 0 {
                tracing::info!(
                    projector = name, partition = shared.partition, from = %hole_from,
                    to = %position, filled, "filled a hole in the JetStream chain from Postgres"
                );
            }
        }
        if !self.apply_pending(shared, &mut tx, &mut pending).await {
            return Ok(None);
        }
        if checkpoint != start {
            sqlx::query(
                "UPDATE read.checkpoints SET transaction_id = $3, global_position = $4, updated_at = now() \
                 WHERE projector = $1 AND partition = $2",
            )
            .bind(name)
            .bind(shared.partition)
            .bind(checkpoint.tx)
            .bind(checkpoint.pos)
            .execute(&mut *tx)
            .await?;
        }
        self.written = None;
        tx.commit().await?;
        self.written = Some(checkpoint);
        if checkpoint != start {
            self.posted(shared, checkpoint);
        }
        let answers = (0..msgs.len())
            .map(|i| match stop {
                Some((s, delay)) if i >= s => AckKind::Nak(Some(delay)),
                _ if terminate[i] => AckKind::Term,
                _ => AckKind::Ack,
            })
            .collect();
        Ok(Some(Applied { outcome, answers }))
    }

    /// Applies the events the fast path gathered and empties `pending`; false when the
    /// projection refuses them: the caller drops the transaction (rolling it back) and the batch
    /// is retried carefully.
    async fn apply_pending(
        &self,
        shared: &Shared,
        tx: &mut PgConnection,
        pending: &mut Vec<RecordedEvent>,
    ) -> bool {
        if let Err(e) = self.projection.apply_batch(tx, pending).await {
            tracing::debug!(
                projector = self.projection.name(), partition = shared.partition, error = %e,
                "batch refused; applying it event by event"
            );
            return false;
        }
        pending.clear();
        true
    }

    /// Posts a committed checkpoint to the process's board, if there is one.
    fn posted(&self, shared: &Shared, checkpoint: Position) {
        if let Some(board) = &shared.config.checkpoint_board {
            board.post(self.projection.name(), shared.partition, checkpoint);
        }
    }

    /// Whether `event` is in the event store, of this partition and at its position: then
    /// everything before it in the partition is committed and final (a log reader published it),
    /// and a hole before it can be filled from Postgres.
    async fn in_store(&self, shared: &Shared, event: &RecordedEvent) -> Result<bool, WorkerError> {
        let stored = shared.store.events_by_id(&[event.event_id]).await?;
        Ok(stored
            .first()
            .is_some_and(|e| e.partition == shared.partition && e.position() == event.position()))
    }
}

/// The `Nura-Prev` chain of a delivered batch, read from its headers alone, once for every
/// projection of the worker: every message is of this partition and each one's `Nura-Prev` is the
/// previous one's position.
struct Chain<'m> {
    /// The first message's `Nura-Prev`: the batch continues a checkpoint that is here.
    from: Position,
    /// The last message's position.
    to: Position,
    /// Each message's stream, in order.
    streams: Vec<&'m str>,
}

impl<'m> Chain<'m> {
    /// `None` when a message lacks one of the headers, is of another partition or does not
    /// continue the message before it (or there are none).
    fn of(partition: i32, msgs: &'m [jetstream::Message]) -> Option<Chain<'m>> {
        use nura_nats::header_names;
        let mut streams = Vec::with_capacity(msgs.len());
        let (mut from, mut last): (Option<Position>, Option<Position>) = (None, None);
        for m in msgs {
            let headers = m.headers.as_ref()?;
            streams.push(headers.get(header_names::STREAM_ID)?.as_str());
            let commit = headers
                .get(header_names::COMMIT)?
                .as_str()
                .parse::<nura_store::CommitToken>()
                .ok()?;
            let prev = nura_nats::prev_of(Some(headers))
                .ok()?
                .unwrap_or(Position::ZERO);
            if commit.partition != partition {
                return None;
            }
            match last {
                None => from = Some(prev),
                Some(l) if l == prev => {}
                Some(_) => return None,
            }
            last = Some(commit.position);
        }
        Some(Chain {
            from: from?,
            to: last?,
            streams,
        })
    }
}

/// A message as the transactional path sees it: its event (or why it could not be read) and how
/// many times it was delivered.
struct Incoming {
    delivered: Result<Delivered, String>,
    attempts: i64,
}

/// Decodes `msgs` for the transactional path; an event of another partition on our subject is
/// undecodable here.
fn incoming(shared: &Shared, msgs: &[jetstream::Message]) -> Vec<Incoming> {
    msgs.iter()
        .map(|m| Incoming {
            delivered: decode_ours(shared, m.headers.as_ref(), &m.payload),
            attempts: m.info().map(|i| i.delivered).unwrap_or(1).max(1),
        })
        .collect()
}

fn decode_ours(
    shared: &Shared,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Delivered, String> {
    nura_nats::decode(headers, payload).and_then(|d| {
        if d.event.partition == shared.partition {
            Ok(d)
        } else {
            Err(format!(
                "event of partition {} on our subject",
                d.event.partition
            ))
        }
    })
}

/// Locks (creating it if needed) the checkpoint row of `(projector, partition)` for the rest of
/// the transaction and returns it. Every writer of that partition's read-model rows takes this
/// lock first, so a stale owner waits and then sees the newer checkpoint.
pub(crate) async fn lock_checkpoint(
    conn: &mut PgConnection,
    projector: &str,
    partition: i32,
) -> Result<Position, sqlx::Error> {
    const SELECT: &str = "SELECT transaction_id, global_position FROM read.checkpoints \
         WHERE projector = $1 AND partition = $2 FOR UPDATE";
    let position = |row: sqlx::postgres::PgRow| Position {
        tx: row.get(0),
        pos: row.get(1),
    };
    // The row exists after the partition's first batch: one round trip from then on.
    if let Some(row) = sqlx::query(SELECT)
        .bind(projector)
        .bind(partition)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(position(row));
    }
    sqlx::query(
        "INSERT INTO read.checkpoints (projector, partition) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(projector)
    .bind(partition)
    .execute(&mut *conn)
    .await?;
    let row = sqlx::query(SELECT)
        .bind(projector)
        .bind(partition)
        .fetch_one(&mut *conn)
        .await?;
    Ok(position(row))
}

/// The name of the group of every registered projection in [`run`]: its consumers are
/// `projectors_p<partition>`, its ownership lock is `nura-projector:projectors`.
pub const GROUP: &str = "projectors";

/// Runs every registered projector — `conversations` (read.conversations + read.messages) and
/// `api_keys` (read.api_keys) — over all partitions until `shutdown` is cancelled, as one
/// [`GROUP`]: one consumer per partition delivers each event once to both. Several instances may
/// run at once: each partition is owned by one of them at a time (the others stand by).
pub async fn run(
    store: EventStore,
    js: jetstream::Context,
    topology: Topology,
    config: ProjectorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let projections: [Arc<dyn Projection>; 2] = [Arc::new(Conversations), Arc::new(ApiKeys)];
    run_group(store, js, topology, config, GROUP, &projections, shutdown).await
}

/// Runs one projection alone over all partitions, with consumers and an ownership lock of its
/// own (named after it), until `shutdown` is cancelled (see [`run`]).
pub async fn run_projection(
    store: EventStore,
    js: jetstream::Context,
    topology: Topology,
    config: ProjectorConfig,
    projection: Arc<dyn Projection>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let name = projection.name();
    run_group(store, js, topology, config, name, &[projection], shutdown).await
}

/// Runs `projections` over all partitions, sharing one consumer per partition named after
/// `name`, until `shutdown` is cancelled. Returns an error if a partition task panicked (the
/// other tasks are stopped first).
async fn run_group(
    store: EventStore,
    js: jetstream::Context,
    topology: Topology,
    config: ProjectorConfig,
    name: &str,
    projections: &[Arc<dyn Projection>],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = shutdown.child_token();
    let mut tasks = JoinSet::new();
    for partition in 0..store.partitions() {
        let worker = PartitionWorker::shared_by(
            store.clone(),
            js.clone(),
            topology.clone(),
            config.clone(),
            name,
            projections,
            partition,
        );
        tasks.spawn(own_and_run(
            worker,
            store.clone(),
            config.clone(),
            local.clone(),
        ));
    }
    let names: Vec<&str> = projections.iter().map(|p| p.name()).collect();
    tracing::info!(
        projector = name,
        projections = ?names,
        partitions = store.partitions(),
        "projector started"
    );
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(projector = name, error = %e, "partition task died; stopping the projector");
            local.cancel();
            failure.get_or_insert(e);
        }
    }
    tracing::info!(projector = name, "projector stopped");
    match failure {
        Some(e) => Err(e).context("a partition task of the projector died"),
        None => Ok(()),
    }
}

/// Stands by until this instance owns the partition, then runs batch steps while it does.
async fn own_and_run(
    mut worker: PartitionWorker,
    store: EventStore,
    config: ProjectorConfig,
    shutdown: CancellationToken,
) {
    let name = worker.name.clone();
    let partition = worker.partition();
    let lock_key = format!("nura-projector:{name}");
    while !shutdown.is_cancelled() {
        let mut lock = match take_ownership(&store, &lock_key, partition).await {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                sleep_or_cancel(STANDBY_RETRY, &shutdown).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(projector = %name, partition, error = %e, "cannot try for ownership");
                sleep_or_cancel(STANDBY_RETRY, &shutdown).await;
                continue;
            }
        };
        tracing::info!(projector = %name, partition, "partition ownership gained");
        metrics::gauge!("nura_projector_owned_partitions", "projector" => name.clone())
            .increment(1.0);
        let mut checked = Instant::now();
        while !shutdown.is_cancelled() {
            if checked.elapsed() >= OWNERSHIP_CHECK {
                checked = Instant::now();
                if let Err(e) = lock.ping().await {
                    tracing::warn!(projector = %name, partition, error = %e, "partition ownership lost");
                    break;
                }
            }
            match worker.process_batch().await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(projector = %name, partition, error = %e, "batch failed; retrying");
                    sleep_or_cancel(config.backoff(1), &shutdown).await;
                }
            }
        }
        worker.release().await;
        metrics::gauge!("nura_projector_owned_partitions", "projector" => name.clone())
            .decrement(1.0);
        // Closing the session releases the advisory lock.
        let _ = lock.close().await;
    }
}

/// Tries the partition's advisory lock on a connection of its own (the lock lives as long as
/// that session). `None`: another instance owns it.
async fn take_ownership(
    store: &EventStore,
    key: &str,
    partition: i32,
) -> Result<Option<PgConnection>, sqlx::Error> {
    let options = store.pool().connect_options();
    let mut conn = PgConnection::connect_with(&options).await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1), $2)")
        .bind(key)
        .bind(partition)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(Some(conn))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_per_attempt_with_jitter_and_is_capped() {
        let c = ProjectorConfig {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1000),
            ..Default::default()
        };
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            let d = c.backoff(attempt).as_millis() as u64;
            assert!(d <= full && d >= full * 3 / 4, "attempt {attempt}: {d} ms");
        }
    }
}
