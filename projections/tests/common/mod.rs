//! Shared test support: conversation traffic, a stand-in publisher (the relay's job), workers
//! driven step by step, and the fold to compare with.
#![allow(dead_code)]

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use nura_domain::DomainEvent;
use nura_domain::api_key::{self, ApiKeyEvent};
use nura_domain::conversation::{ConversationEvent, stream_id};
use nura_nats::Topology;
use nura_projections::api_keys::ApiKeys;
use nura_projections::conversations::{self, Conversations};
use nura_projections::{ApplyError, BatchOutcome, PartitionWorker, Projection, ProjectorConfig};
use nura_store::{
    CommitToken, EventStore, ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent,
};
use nura_testkit::{TestDb, nats_client, unique_name};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A fresh database, store, JetStream context and private topology.
pub struct Env {
    pub db: TestDb,
    pub store: EventStore,
    pub js: jetstream::Context,
    pub topology: Topology,
}

impl Env {
    pub async fn new() -> Env {
        nura_testkit::init_tracing();
        let db = TestDb::new().await;
        let store = EventStore::connect(db.pool.clone()).await.expect("store");
        let js = jetstream::new(nats_client().await);
        let topology = Topology::named(&unique_name("EV"), &unique_name("t"));
        topology.ensure_stream(&js).await.expect("stream");
        Env {
            db,
            store,
            js,
            topology,
        }
    }

    /// One worker per partition.
    pub fn workers(&self, config: &ProjectorConfig) -> Vec<PartitionWorker> {
        (0..self.store.partitions())
            .map(|p| {
                PartitionWorker::new(
                    self.store.clone(),
                    self.js.clone(),
                    self.topology.clone(),
                    config.clone(),
                    Arc::new(Conversations),
                    p,
                )
            })
            .collect()
    }

    /// One worker per partition for `conversations` and `api_keys` sharing a consumer, as
    /// [`nura_projections::run`] runs them.
    pub fn group_workers(&self, config: &ProjectorConfig) -> Vec<PartitionWorker> {
        let projections: [Arc<dyn Projection>; 2] = [Arc::new(Conversations), Arc::new(ApiKeys)];
        (0..self.store.partitions())
            .map(|p| {
                PartitionWorker::shared_by(
                    self.store.clone(),
                    self.js.clone(),
                    self.topology.clone(),
                    config.clone(),
                    nura_projections::GROUP,
                    &projections,
                    p,
                )
            })
            .collect()
    }

    pub async fn cleanup(&self) {
        let _ = self.js.delete_stream(&self.topology.stream).await;
    }
}

/// A short-fuse configuration for tests.
pub fn test_config() -> ProjectorConfig {
    ProjectorConfig {
        batch_size: 64,
        max_attempts: 3,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ack_wait: Duration::from_secs(2),
        idle_fetch_wait: Duration::from_millis(200),
        checkpoint_board: None,
        fill_page: 1000,
    }
}

pub fn at(n: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + n, 0).expect("time")
}

pub fn meta(tenant: &str) -> Metadata {
    Metadata {
        tenant_id: tenant.into(),
        actor: "tester".into(),
        command_id: Uuid::now_v7().to_string(),
        correlation_id: "test".into(),
        causation_id: None,
    }
}

pub fn new_event(e: &ConversationEvent) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: e.event_type().into(),
        schema_version: 1,
        payload: e.to_payload(),
    }
}

pub fn started(id: Uuid, tenant: &str, n: i64) -> ConversationEvent {
    ConversationEvent::ConversationStarted {
        conversation_id: id,
        tenant_id: tenant.into(),
        title: format!("conversation {n}"),
        started_by: "alice".into(),
        at: at(n),
    }
}

pub fn posted(text: &str, n: i64) -> ConversationEvent {
    ConversationEvent::MessagePosted {
        message_id: Uuid::now_v7(),
        author: "alice".into(),
        text: text.into(),
        at: at(n),
    }
}

pub fn archived(n: i64) -> ConversationEvent {
    ConversationEvent::ConversationArchived {
        archived_by: "alice".into(),
        at: at(n),
    }
}

/// Appends `events` to conversation `id` (one command).
pub async fn append(store: &EventStore, id: Uuid, tenant: &str, events: &[ConversationEvent]) {
    let new: Vec<NewEvent> = events.iter().map(new_event).collect();
    store
        .append(
            &stream_id(id),
            ExpectedVersion::Any,
            &new,
            &meta(tenant),
            None,
        )
        .await
        .expect("append");
}

/// Appends `total` events over `streams` conversations (starts first, then messages round robin,
/// a few archives at the end). Returns the number of MessagePosted events per conversation.
pub async fn append_traffic(
    store: &EventStore,
    streams: usize,
    total: usize,
    tenant: &str,
) -> HashMap<Uuid, i64> {
    let ids: Vec<Uuid> = (0..streams).map(|_| Uuid::now_v7()).collect();
    let mut counts = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        append(store, *id, tenant, &[started(*id, tenant, i as i64)]).await;
        counts.insert(*id, 0);
    }
    let mut left = total.saturating_sub(streams);
    let mut round = 0i64;
    while left > 0 {
        for id in &ids {
            if left == 0 {
                break;
            }
            // Two messages per command now and then: multi-event commands share a transaction.
            let k = if round % 3 == 0 && left >= 2 { 2 } else { 1 };
            let evs: Vec<ConversationEvent> = (0..k)
                .map(|j| posted(&format!("m{round}-{j}"), 1000 + round))
                .collect();
            append(store, *id, tenant, &evs).await;
            *counts.get_mut(id).expect("id") += k as i64;
            left -= k;
        }
        round += 1;
    }
    counts
}

/// Stands in for the relay: publishes the log in commit order with the partition chain.
pub struct Publisher {
    pub js: jetstream::Context,
    pub topology: Topology,
    pub after: Position,
    pub prev: HashMap<i32, Position>,
}

impl Publisher {
    pub fn new(env: &Env) -> Publisher {
        Publisher {
            js: env.js.clone(),
            topology: env.topology.clone(),
            after: Position::ZERO,
            prev: HashMap::new(),
        }
    }

    /// Publishes everything committed since the last call; returns (event, prev) in order.
    /// Waits (bounded) until every stored event is published: `read_all` stops at the oldest
    /// open transaction of the whole cluster, which other tests may hold for a while.
    pub async fn publish_new(
        &mut self,
        store: &EventStore,
    ) -> Vec<(RecordedEvent, Option<Position>)> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let page = store.read_all(self.after, 1000).await.expect("read_all");
            if page.is_empty() {
                let stored = store
                    .count_until(Position {
                        tx: i64::MAX,
                        pos: i64::MAX,
                    })
                    .await
                    .expect("count");
                let published = store.count_until(self.after).await.expect("count");
                if published >= stored {
                    return out;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "log readers held back for 60 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let mut acks = Vec::new();
            for e in page {
                let prev = self.prev.insert(e.partition, e.position());
                acks.push(self.publish(&e, prev, None).await);
                self.after = e.position();
                out.push((e, prev));
            }
            for a in acks {
                a.await.expect("puback");
            }
        }
    }

    /// Publishes one event with `prev`; `msg_id` overrides the de-duplication id (a republish
    /// after the dedup window looks like a new message to JetStream).
    pub async fn publish(
        &self,
        e: &RecordedEvent,
        prev: Option<Position>,
        msg_id: Option<&str>,
    ) -> jetstream::context::PublishAckFuture {
        let (mut headers, body) = nura_nats::encode(e, prev);
        if let Some(id) = msg_id {
            headers.insert(nura_nats::headers::MSG_ID, id);
        }
        self.js
            .publish_with_headers(self.topology.subject(e), headers, body)
            .await
            .expect("publish")
    }
}

/// The last position of each partition in the log.
pub async fn partition_heads(store: &EventStore) -> HashMap<i32, Position> {
    let rows: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (partition) partition, transaction_id::text::bigint, global_position \
         FROM es.events ORDER BY partition, transaction_id DESC, global_position DESC",
    )
    .fetch_all(store.pool())
    .await
    .expect("heads");
    rows.into_iter()
        .map(|(p, tx, pos)| (p, Position { tx, pos }))
        .collect()
}

/// True once every partition's `conversations` checkpoint reached its head.
pub async fn caught_up(store: &EventStore, heads: &HashMap<i32, Position>) -> bool {
    projector_caught_up(store, conversations::NAME, heads).await
}

/// True once every partition's checkpoint of `projector` reached its head.
pub async fn projector_caught_up(
    store: &EventStore,
    projector: &str,
    heads: &HashMap<i32, Position>,
) -> bool {
    for (p, pos) in heads {
        let token = CommitToken {
            position: *pos,
            partition: *p,
        };
        if !nura_projections::has_passed(store.pool(), projector, token)
            .await
            .expect("has_passed")
        {
            return false;
        }
    }
    true
}

/// Workers stepping in background tasks until cancelled; each returns its summed outcome.
pub struct Running {
    pub stop: CancellationToken,
    pub tasks: Vec<JoinHandle<(PartitionWorker, BatchOutcome)>>,
}

pub fn spawn_workers(workers: Vec<PartitionWorker>) -> Running {
    let stop = CancellationToken::new();
    let tasks = workers
        .into_iter()
        .map(|mut w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sum = BatchOutcome::default();
                while !stop.is_cancelled() {
                    match w.process_batch().await {
                        Ok(o) => add(&mut sum, &o),
                        Err(e) => {
                            tracing::warn!(error = %e, "step failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                (w, sum)
            })
        })
        .collect();
    Running { stop, tasks }
}

impl Running {
    pub async fn stop(self) -> (Vec<PartitionWorker>, BatchOutcome) {
        self.stop.cancel();
        let mut sum = BatchOutcome::default();
        let mut workers = Vec::new();
        for t in self.tasks {
            let (w, o) = t.await.expect("worker task");
            add(&mut sum, &o);
            workers.push(w);
        }
        (workers, sum)
    }
}

pub fn add(sum: &mut BatchOutcome, o: &BatchOutcome) {
    sum.fetched += o.fetched;
    sum.applied += o.applied;
    sum.skipped += o.skipped;
    sum.holes_filled += o.holes_filled;
    sum.dead_lettered += o.dead_lettered;
    sum.parked += o.parked;
    sum.nacked += o.nacked;
    sum.undecodable += o.undecodable;
    sum.gated += o.gated;
}

/// Polls until every partition's `conversations` checkpoint reached its head, or panics after
/// `limit`.
pub async fn wait_caught_up(store: &EventStore, heads: &HashMap<i32, Position>, limit: Duration) {
    wait_projector_caught_up(store, conversations::NAME, heads, limit).await
}

/// Polls until every partition's checkpoint of `projector` reached its head, or panics after
/// `limit`.
pub async fn wait_projector_caught_up(
    store: &EventStore,
    projector: &str,
    heads: &HashMap<i32, Position>,
    limit: Duration,
) {
    tokio::time::timeout(limit, async {
        while !projector_caught_up(store, projector, heads).await {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("projector did not catch up in time");
}

/// The read model a clean fold of `store`'s log produces, as dumped text.
pub async fn fold_dump(store: &EventStore) -> (String, String) {
    let clean = TestDb::new().await;
    nura_projections::fold(store, &clean.pool, &Conversations)
        .await
        .expect("fold");
    conversations::dump(&clean.pool).await.expect("dump")
}

/// Asserts that `env`'s read model equals a clean fold of its log.
pub async fn assert_read_model_is_the_fold(env: &Env) {
    assert_eq!(
        conversations::dump(&env.db.pool).await.expect("dump"),
        fold_dump(&env.store).await
    );
}

/// Asserts the read model equals the fold and message counts equal the posted counts.
pub async fn assert_equals_fold(store: &EventStore, counts: &HashMap<Uuid, i64>) {
    let actual = conversations::dump(store.pool()).await.expect("dump");
    let expected = fold_dump(store).await;
    assert!(
        actual.0 == expected.0,
        "read.conversations differs from the fold"
    );
    assert!(
        actual.1 == expected.1,
        "read.messages differs from the fold"
    );
    let rows: Vec<(Uuid, i64)> =
        sqlx::query_as("SELECT conversation_id, message_count FROM read.conversations")
            .fetch_all(store.pool())
            .await
            .expect("counts");
    let actual_counts: HashMap<Uuid, i64> = rows.into_iter().collect();
    for (id, n) in counts {
        assert_eq!(actual_counts.get(id), Some(n), "message_count of {id}");
    }
}

/// The whole log in commit order (waiting, bounded, while an open transaction elsewhere on the
/// server holds log readers back).
pub async fn log(env: &Env) -> Vec<RecordedEvent> {
    let stored = total_events(&env.store).await as usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = env
            .store
            .read_all(Position::ZERO, 10_000)
            .await
            .expect("read_all");
        if events.len() >= stored {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "log readers held back for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn total_events(store: &EventStore) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM es.events")
        .fetch_one(store.pool())
        .await
        .expect("count")
}

/// Makes Postgres refuse, while `on`, to insert a message whose text is `poison`: the
/// conversations projection then fails on that event like on a poison event.
pub async fn set_poison_trigger(env: &Env, on: bool) {
    let statements: &[&'static str] = if on {
        &[
            "CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.text = 'poison' THEN RAISE EXCEPTION 'poison message refused'; END IF; \
             RETURN NEW; END $$",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON read.messages \
             FOR EACH ROW EXECUTE FUNCTION public.refuse_poison()",
        ]
    } else {
        &["DROP TRIGGER refuse_poison ON read.messages"]
    };
    for s in statements {
        sqlx::query(*s)
            .execute(&env.db.pool)
            .await
            .expect("trigger");
    }
}

/// An API key `key_id` of `tenant` was issued.
pub fn issued(key_id: Uuid, tenant: &str) -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyIssued {
        key_id,
        tenant_id: tenant.into(),
        name: "ci".into(),
        roles: vec!["service".into(), "viewer".into()],
        secret_hash: "cd".repeat(32),
        issued_by: "alice".into(),
        at: at(1),
    }
}

/// The key was revoked.
pub fn revoked() -> ApiKeyEvent {
    ApiKeyEvent::ApiKeyRevoked {
        revoked_by: "bob".into(),
        at: at(2),
    }
}

/// Appends `e` to API key `key_id` (one command); returns its commit token.
pub async fn append_key(
    store: &EventStore,
    key_id: Uuid,
    tenant: &str,
    e: &ApiKeyEvent,
) -> CommitToken {
    let new = NewEvent {
        event_id: Uuid::now_v7(),
        event_type: e.event_type().into(),
        schema_version: 1,
        payload: e.to_payload(),
    };
    store
        .append(
            &api_key::stream_id(key_id),
            ExpectedVersion::Any,
            &[new],
            &meta(tenant),
            None,
        )
        .await
        .expect("append")
        .commit
}

/// Applies every API-key event of `store` through the projection into `target`, stream by
/// stream. Not `fold`: `read_all` stops at the oldest transaction open anywhere on the shared
/// server, and other tests hold some open on purpose.
pub async fn apply_all(store: &EventStore, target: &sqlx::PgPool) -> Result<(), ApplyError> {
    let streams: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT stream_id FROM es.events WHERE stream_id LIKE 'apikey-%'",
    )
    .fetch_all(store.pool())
    .await?;
    let mut tx = target.begin().await?;
    for s in streams {
        let events = store
            .read_stream(&s, 0, 1000)
            .await
            .map_err(|e| ApplyError::Inconsistent(e.to_string()))?;
        for e in events {
            ApiKeys.apply(&mut tx, &e).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
