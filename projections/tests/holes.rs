//! R3: JetStream loses messages from the middle of the stream and an event is republished after
//! the de-duplication window; the projector fills holes from Postgres and the read model still
//! equals the fold, with every event applied exactly once.

mod common;

use common::*;
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_lost_from_the_middle_and_republished_late_still_give_the_fold() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let counts = append_traffic(&env.store, 30, 1200, "acme").await;
        let total = total_events(&env.store).await as usize;
        let mut publisher = Publisher::new(&env);
        let published = publisher.publish_new(&env.store).await;
        // Stream sequences follow publish order (one publisher, each ack awaited per page).
        let stream = env
            .js
            .get_stream(&env.topology.stream)
            .await
            .expect("stream");
        let mut lost = HashSet::new();
        for seq in (5..=published.len() as u64).step_by(7) {
            assert!(stream.delete_message(seq).await.expect("delete"));
            lost.insert(seq as usize - 1);
        }
        // Lose the tail of the stream too: no later message will reveal that hole.
        let tail: Vec<usize> = (published.len() - 3..published.len()).collect();
        for i in &tail {
            if lost.insert(*i) {
                assert!(stream.delete_message(*i as u64 + 1).await.expect("delete"));
            }
        }

        let config = test_config();
        let running = spawn_workers(env.workers(&config));
        // Every partition reaches its last delivered message; losses before it are filled from
        // Postgres, losses after it stay unseen until something reveals them.
        let mut delivered_heads = std::collections::HashMap::new();
        for (i, (e, _)) in published.iter().enumerate() {
            if !lost.contains(&i) {
                delivered_heads.insert(e.partition, e.position());
            }
        }
        wait_caught_up(&env.store, &delivered_heads, Duration::from_secs(30)).await;

        // The relay's reconciliation republishes what JetStream lost, long after the dedup
        // window: a new message id, so JetStream stores it again.
        let mut acks = Vec::new();
        for i in lost
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (e, prev) = &published[i];
            let id = format!("{}-republished", e.event_id);
            acks.push(publisher.publish(e, *prev, Some(&id)).await);
        }
        for a in acks {
            a.await.expect("puback");
        }
        // And one event twice more, as a late duplicate of something long applied.
        let (e, prev) = &published[10];
        publisher
            .publish(e, *prev, Some(&format!("{}-again", e.event_id)))
            .await
            .await
            .expect("puback");

        let heads = partition_heads(&env.store).await;
        wait_caught_up(&env.store, &heads, Duration::from_secs(30)).await;
        let (_, outcome) = running.stop().await;
        println!(
            "verdict R3: sent={} stored={total} deleted={} republished={} delivered={} applied={} \
             holes_filled={} skipped={} lost={} duplicated={}",
            published.len(),
            lost.len(),
            lost.len() + 1,
            outcome.fetched,
            outcome.applied,
            outcome.holes_filled,
            outcome.skipped,
            total.saturating_sub(outcome.applied),
            outcome.applied.saturating_sub(total)
        );
        assert_eq!(outcome.applied, total, "every event applied exactly once");
        assert!(outcome.holes_filled > 0, "holes were filled from Postgres");
        assert!(outcome.skipped > 0, "republished events were skipped");
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_and_recreated_stream_is_consumed_again_without_double_applying() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let counts = append_traffic(&env.store, 10, 300, "acme").await;
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let config = test_config();
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(
            &env.store,
            &partition_heads(&env.store).await,
            Duration::from_secs(30),
        )
        .await;

        // The stream disappears (operator error, storage loss) and the relay rebuilds it from
        // Postgres: everything is published again, under the same ids, into a fresh stream.
        env.js
            .delete_stream(&env.topology.stream)
            .await
            .expect("delete stream");
        env.topology.ensure_stream(&env.js).await.expect("recreate");
        let more = append_traffic(&env.store, 5, 100, "acme").await;
        let mut fresh = Publisher::new(&env);
        fresh.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        wait_caught_up(&env.store, &heads, Duration::from_secs(60)).await;
        let (_, outcome) = running.stop().await;
        let total = total_events(&env.store).await as usize;
        println!(
            "verdict stream recreated: stored={total} applied={} skipped={} lost={} duplicated={}",
            outcome.applied,
            outcome.skipped,
            total.saturating_sub(outcome.applied),
            outcome.applied.saturating_sub(total)
        );
        assert_eq!(outcome.applied, total);
        let mut all = counts;
        all.extend(more);
        assert_equals_fold(&env.store, &all).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_foreign_messages_are_terminated_without_stalling_the_partition() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let counts = append_traffic(&env.store, 3, 30, "acme").await;
        let mut publisher = Publisher::new(&env);
        let published = publisher.publish_new(&env.store).await;
        let (real, _) = &published[0];
        // An event of some other database, on our subjects, with a broken chain.
        let mut foreign = real.clone();
        foreign.event_id = uuid::Uuid::now_v7();
        foreign.transaction_id += 1_000_000;
        foreign.global_position += 1_000_000;
        publisher
            .publish(&foreign, Some(nura_store::Position { tx: 1, pos: 1 }), None)
            .await
            .await
            .expect("puback");
        // And a body that is not an event at all.
        let subject = env.topology.subject(real);
        env.js
            .publish(subject, "not json".into())
            .await
            .expect("publish")
            .await
            .expect("puback");
        let more = append_traffic(&env.store, 2, 10, "acme").await;
        publisher.publish_new(&env.store).await;
        let running = spawn_workers(env.workers(&test_config()));
        wait_caught_up(
            &env.store,
            &partition_heads(&env.store).await,
            Duration::from_secs(30),
        )
        .await;
        let (_, outcome) = running.stop().await;
        assert_eq!(outcome.undecodable, 2);
        assert_eq!(outcome.applied, total_events(&env.store).await as usize);
        let mut all = counts;
        all.extend(more);
        assert_equals_fold(&env.store, &all).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hole_longer_than_a_page_is_filled_page_by_page() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(90), async {
        let counts = append_traffic(&env.store, 20, 400, "acme").await;
        let total = total_events(&env.store).await as usize;
        let mut publisher = Publisher::new(&env);
        let published = publisher.publish_new(&env.store).await;
        assert_eq!(published.len(), total);
        // JetStream loses the first 300 messages: each partition's first delivered message
        // reveals a hole of dozens of events, many times the page below.
        let stream = env
            .js
            .get_stream(&env.topology.stream)
            .await
            .expect("stream");
        let lost = 300;
        for seq in 1..=lost {
            assert!(stream.delete_message(seq).await.expect("delete"));
        }
        let config = nura_projections::ProjectorConfig {
            fill_page: 5,
            ..test_config()
        };
        let running = spawn_workers(env.workers(&config));
        wait_caught_up(
            &env.store,
            &partition_heads(&env.store).await,
            Duration::from_secs(30),
        )
        .await;
        let (_, outcome) = running.stop().await;
        assert_eq!(outcome.applied, total, "every event applied exactly once");
        assert_eq!(
            outcome.holes_filled, lost as usize,
            "each lost message refilled once"
        );
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
