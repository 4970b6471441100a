//! The batch path: a projection applying a whole batch with set-based statements must leave the
//! rows that applying its events one by one leaves, and a poison event inside a batch must still
//! end as one dead letter while the rest of the batch applies. A caught-up worker's next batch
//! holds every message that arrived while it applied the last one.

mod common;

use common::*;
use nura_projections::Projection;
use nura_projections::conversations::{self, Conversations};
use nura_store::RecordedEvent;
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

/// Applies `events` as one batch in one transaction, as the runtime's fast path does.
async fn apply_as_batch(env: &Env, events: &[RecordedEvent]) {
    let mut tx = env.db.pool.begin().await.expect("begin");
    Conversations
        .apply_batch(&mut tx, events)
        .await
        .expect("the batch applies");
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_leaves_the_rows_that_applying_its_events_one_by_one_leaves() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let (a, b, c, d) = (
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
            Uuid::now_v7(),
        );
        // First batch: a and c start, a gets messages.
        append(
            &env.store,
            a,
            "acme",
            &[started(a, "acme", 1), posted("a1", 2)],
        )
        .await;
        append(&env.store, c, "acme", &[started(c, "acme", 3)]).await;
        append(&env.store, a, "acme", &[posted("a2", 4)]).await;
        let first = log(&env).await.len();
        // Second batch: messages to a (started before the batch) and to b (started within it),
        // archives with and without messages, a message after an archive (the read model follows
        // the log), and another tenant interleaved.
        append(&env.store, b, "globex", &[started(b, "globex", 5)]).await;
        append(&env.store, a, "acme", &[posted("a3", 6), posted("a4", 7)]).await;
        append(&env.store, b, "globex", &[posted("b1", 8)]).await;
        append(&env.store, c, "acme", &[archived(9)]).await;
        append(
            &env.store,
            d,
            "acme",
            &[started(d, "acme", 10), archived(11)],
        )
        .await;
        append(&env.store, a, "acme", &[archived(12)]).await;
        append(&env.store, b, "globex", &[posted("b2", 13)]).await;
        append(&env.store, a, "acme", &[posted("a5", 14)]).await;
        let events = log(&env).await;
        assert_eq!(events.len(), 14);

        apply_as_batch(&env, &events[..first]).await;
        // The second batch starts three events early: a redelivery overlapping what the first
        // batch applied must change nothing (the version guard, set-based).
        apply_as_batch(&env, &events[first - 3..]).await;
        let expected = fold_dump(&env.store).await;
        let actual = conversations::dump(&env.db.pool).await.expect("dump");
        assert_eq!(
            actual.0, expected.0,
            "read.conversations differs from one by one"
        );
        assert_eq!(
            actual.1, expected.1,
            "read.messages differs from one by one"
        );

        // The whole log again as one batch (a replay) changes nothing either.
        apply_as_batch(&env, &events).await;
        assert_eq!(
            conversations::dump(&env.db.pool).await.expect("dump"),
            expected
        );

        let rows: Vec<(Uuid, i64, String)> =
            sqlx::query_as("SELECT conversation_id, message_count, status FROM read.conversations")
                .fetch_all(&env.db.pool)
                .await
                .expect("rows");
        let rows: HashMap<Uuid, (i64, String)> =
            rows.into_iter().map(|(id, n, s)| (id, (n, s))).collect();
        assert_eq!(rows[&a], (5, "archived".into()));
        assert_eq!(rows[&b], (2, "active".into()));
        assert_eq!(rows[&c], (0, "archived".into()));
        assert_eq!(rows[&d], (0, "archived".into()));
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_set_based_path_cannot_prove_equivalent_is_refused_and_writes_nothing() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let (a, never) = (Uuid::now_v7(), Uuid::now_v7());
        append(
            &env.store,
            a,
            "acme",
            &[started(a, "acme", 1), posted("a1", 2)],
        )
        .await;
        append(&env.store, never, "acme", &[started(never, "acme", 3)]).await;
        append(&env.store, never, "acme", &[posted("lost?", 4)]).await;
        let events = log(&env).await;

        // A message to a conversation whose start was never applied (the start is left out).
        let orphan = vec![events[0].clone(), events[1].clone(), events[3].clone()];
        // A stream's versions not rising within the batch.
        let reordered = vec![events[1].clone(), events[0].clone()];
        for (what, batch) in [("orphan", orphan), ("reordered", reordered)] {
            let mut tx = env.db.pool.begin().await.expect("begin");
            let result = Conversations.apply_batch(&mut tx, &batch).await;
            assert!(result.is_err(), "{what}: refused");
            drop(tx);
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM read.conversations")
                .fetch_one(&env.db.pool)
                .await
                .expect("count");
            assert_eq!(n, 0, "{what}: the runtime rolls back, nothing stays");
        }
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_event_inside_a_batch_is_one_dead_letter_and_the_rest_of_the_batch_applies() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        sqlx::query(
            "CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.text = 'poison' THEN RAISE EXCEPTION 'poison message refused'; END IF; \
             RETURN NEW; END $$",
        )
        .execute(&env.db.pool)
        .await
        .expect("function");
        sqlx::query(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON read.messages \
             FOR EACH ROW EXECUTE FUNCTION public.refuse_poison()",
        )
        .execute(&env.db.pool)
        .await
        .expect("trigger");
        let mut counts = append_traffic(&env.store, 16, 80, "acme").await;
        // The poisoned conversation shares a partition with a conversation of the traffic
        // before it, and another conversation of that partition follows it: the poison sits
        // inside its partition's batch whatever ids the traffic drew.
        let partitions = env.store.partitions();
        let partition_of = |id: Uuid| {
            nura_store::partition_of(&nura_domain::conversation::stream_id(id), partitions)
        };
        let shared = partition_of(*counts.keys().next().expect("traffic"));
        let in_shared = || loop {
            let id = Uuid::now_v7();
            if partition_of(id) == shared {
                return id;
            }
        };
        let poisoned = in_shared();
        append(
            &env.store,
            poisoned,
            "acme",
            &[started(poisoned, "acme", 0), posted("ok", 1)],
        )
        .await;
        append(&env.store, poisoned, "acme", &[posted("poison", 2)]).await;
        counts.insert(poisoned, 1);
        let neighbour = in_shared();
        append(
            &env.store,
            neighbour,
            "acme",
            &[started(neighbour, "acme", 0), posted("after", 1)],
        )
        .await;
        counts.insert(neighbour, 1);
        for (id, n) in append_traffic(&env.store, 16, 80, "acme").await {
            counts.insert(id, n);
        }
        let events = log(&env).await;
        let poison = events
            .iter()
            .position(|e| {
                e.stream_id == nura_domain::conversation::stream_id(poisoned)
                    && e.stream_version == 3
            })
            .expect("the poison event");
        let partition = events[poison].partition;
        let before = events[..poison]
            .iter()
            .filter(|e| e.partition == partition)
            .count();
        let after = events[poison + 1..]
            .iter()
            .filter(|e| e.partition == partition)
            .count();
        assert!(
            before > 0 && after > 0,
            "the poison sits inside its partition's batch"
        );

        let mut publisher = Publisher::new(&env);
        let sent = publisher.publish_new(&env.store).await.len();
        let heads = partition_heads(&env.store).await;
        // Every partition's backlog fits one batch, so the poison is fetched amid the others.
        let config = nura_projections::ProjectorConfig {
            batch_size: 256,
            ..test_config()
        };
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (mut workers, outcome) = running.stop().await;
        for w in &mut workers {
            w.release().await;
        }
        println!(
            "verdict batch poison: sent={sent} applied={} dead_lettered={} parked={} nacked={}",
            outcome.applied, outcome.dead_lettered, outcome.parked, outcome.nacked
        );
        assert_eq!(outcome.dead_lettered, 1, "exactly one dead letter");
        assert_eq!(outcome.parked, 0, "nothing of its stream came after it");
        assert_eq!(outcome.applied, sent - 1, "every other event applied");
        let rows: Vec<(Uuid, i32, String)> =
            sqlx::query_as("SELECT event_id, attempts, status FROM read.dead_letters")
                .fetch_all(&env.db.pool)
                .await
                .expect("dead letters");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, events[poison].event_id);
        assert_eq!(
            (rows[0].1, rows[0].2.as_str()),
            (config.max_attempts as i32, "open")
        );
        let actual: Vec<(Uuid, i64)> =
            sqlx::query_as("SELECT conversation_id, message_count FROM read.conversations")
                .fetch_all(&env.db.pool)
                .await
                .expect("counts");
        assert_eq!(actual.len(), counts.len());
        for (id, n) in actual {
            assert_eq!(Some(&n), counts.get(&id), "message_count of {id}");
        }

        // Once the poison can be applied, a retry makes the read model equal the fold.
        sqlx::query("DROP TRIGGER refuse_poison ON read.messages")
            .execute(&env.db.pool)
            .await
            .expect("drop trigger");
        let id: i64 = sqlx::query_scalar("SELECT id FROM read.dead_letters")
            .fetch_one(&env.db.pool)
            .await
            .expect("id");
        nura_projections::retry_dead_letter(&env.store, None, id)
            .await
            .expect("retry");
        counts.insert(poisoned, 2);
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

/// A worker that is caught up leaves no fetch waiting while it applies a batch: such a request
/// would be answered by the first message to arrive, so steady traffic would come in batches of
/// one or two. The next fetch, made after the apply, takes every message that arrived meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caught_up_worker_fetches_after_applying_so_the_next_batch_takes_all_that_arrived() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let config = nura_projections::ProjectorConfig {
            idle_fetch_wait: Duration::from_secs(5),
            ..test_config()
        };
        let id = Uuid::now_v7();
        append(
            &env.store,
            id,
            "acme",
            &[started(id, "acme", 1), posted("a", 2)],
        )
        .await;
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let partition = log(&env).await[0].partition;
        let mut worker = nura_projections::PartitionWorker::new(
            env.store.clone(),
            env.js.clone(),
            env.topology.clone(),
            config,
            std::sync::Arc::new(Conversations),
            partition,
        );
        let first = worker.process_batch().await.expect("first batch");
        assert_eq!((first.fetched, first.applied), (2, 2));
        let mut consumer = worker.consumer().await.expect("consumer");
        let waiting = consumer.info().await.expect("consumer info").num_waiting;
        assert_eq!(waiting, 0, "a fetch left waiting after a partial batch");

        for n in 3..=5 {
            append(&env.store, id, "acme", &[posted("b", n)]).await;
            publisher.publish_new(&env.store).await;
        }
        let second = worker.process_batch().await.expect("second batch");
        assert_eq!((second.fetched, second.applied), (3, 3), "{second:?}");
        worker.release().await;
        assert_read_model_is_the_fold(&env).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
