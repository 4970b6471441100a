//! P2: redeliveries (naks, dropped acks), concurrent workers on the same partitions and two
//! runtime instances leave the read model equal to a clean fold, with no event applied twice.

mod common;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use common::*;
use futures::StreamExt;
use nura_projections::conversations;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn events() -> usize {
    std::env::var("NURA_TEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Grabs messages from the projectors' own durable consumers and naks half of them (redelivered
/// at once) and leaves the other half unacked (redelivered after ack_wait).
async fn chaos(
    js: async_nats::jetstream::Context,
    topology: nura_nats::Topology,
    partitions: i32,
    stop: CancellationToken,
) -> (usize, usize) {
    let stream = topology.ensure_stream(&js).await.expect("stream");
    let mut consumers: Vec<PullConsumer> = Vec::new();
    for p in 0..partitions {
        let name = format!("{}_p{p}", conversations::NAME);
        // The workers create the same consumers at the same time, with another ack policy: the
        // loser of that race fails to create and finds the winner's consumer on a second try.
        let mut tries = 0;
        let c = loop {
            match stream
                .get_or_create_consumer(
                    &name,
                    pull::Config {
                        durable_name: Some(name.clone()),
                        deliver_policy: DeliverPolicy::All,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: test_config().ack_wait,
                        max_deliver: -1,
                        filter_subject: topology.partition_filter(p),
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(c) => break c,
                Err(e) if tries < 5 => {
                    tries += 1;
                    tracing::debug!(error = %e, "chaos consumer not created; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("consumer {name}: {e}"),
            }
        };
        consumers.push(c);
    }
    let (mut nacked, mut dropped) = (0, 0);
    let mut flip = false;
    while !stop.is_cancelled() {
        for c in &consumers {
            let mut batch = c
                .fetch()
                .max_messages(7)
                .expires(Duration::from_millis(50))
                .messages()
                .await
                .expect("chaos fetch");
            while let Some(Ok(m)) = batch.next().await {
                flip = !flip;
                if flip {
                    m.ack_with(AckKind::Nak(None)).await.expect("nak");
                    nacked += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nacked, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn naks_dropped_acks_and_two_concurrent_workers_per_partition_apply_every_event_exactly_once()
{
    let env = Env::new().await;
    let n = events();
    tokio::time::timeout(Duration::from_secs(120), async {
        let counts = append_traffic(&env.store, 50, n, "acme").await;
        let total = total_events(&env.store).await as usize;
        let heads = partition_heads(&env.store).await;
        let mut publisher = Publisher::new(&env);
        // Workers first, so the chaos fetcher competes with them from the start.
        let config = test_config();
        let a = spawn_workers(env.workers(&config));
        let b = spawn_workers(env.workers(&config));
        let chaos_stop = CancellationToken::new();
        let chaos_task = {
            let stop = chaos_stop.clone();
            tokio::spawn(chaos(
                env.js.clone(),
                env.topology.clone(),
                env.store.partitions(),
                stop,
            ))
        };
        let published = publisher.publish_new(&env.store).await.len();
        // Let the chaos run for a while before allowing the workers to finish.
        tokio::time::sleep(Duration::from_secs(3)).await;
        chaos_stop.cancel();
        let (nacked, dropped) = chaos_task.await.expect("chaos");
        wait_caught_up(&env.store, &heads, Duration::from_secs(60)).await;
        let (_, sa) = a.stop().await;
        let (_, sb) = b.stop().await;
        let applied = sa.applied + sb.applied;
        println!(
            "verdict P2: sent={published} stored={total} nacked_by_chaos={nacked} dropped_acks={dropped} \
             applied={applied} (a={}, b={}) skipped={} holes_filled={} lost={} duplicated={}",
            sa.applied,
            sb.applied,
            sa.skipped + sb.skipped,
            sa.holes_filled + sb.holes_filled,
            total.saturating_sub(applied),
            applied.saturating_sub(total),
        );
        assert_eq!(applied, total, "every event applied exactly once across both workers");
        assert_eq!(sa.dead_lettered + sb.dead_lettered, 0);
        assert_equals_fold(&env.store, &counts).await;
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runtime_instances_share_the_partitions_and_survive_one_stopping() {
    let env = Env::new().await;
    tokio::time::timeout(Duration::from_secs(120), async {
        let counts = append_traffic(&env.store, 40, 1500, "acme").await;
        let mut publisher = Publisher::new(&env);
        publisher.publish_new(&env.store).await;
        let first = CancellationToken::new();
        let second = CancellationToken::new();
        let run = |token: CancellationToken| {
            let (store, js, topology) = (env.store.clone(), env.js.clone(), env.topology.clone());
            tokio::spawn(nura_projections::run_projection(
                store,
                js,
                topology,
                test_config(),
                std::sync::Arc::new(conversations::Conversations),
                token,
            ))
        };
        let one = run(first.clone());
        let two = run(second.clone());
        // Let them split the partitions, then stop the first: the second takes over its
        // partitions after standing by.
        tokio::time::sleep(Duration::from_secs(2)).await;
        first.cancel();
        one.await.expect("join").expect("first instance");
        let more = append_traffic(&env.store, 10, 300, "acme").await;
        publisher.publish_new(&env.store).await;
        let heads = partition_heads(&env.store).await;
        wait_caught_up(&env.store, &heads, Duration::from_secs(60)).await;
        second.cancel();
        two.await.expect("join").expect("second instance");
        let mut all = counts;
        all.extend(more);
        assert_equals_fold(&env.store, &all).await;
        println!(
            "verdict P2 (two instances): stored={} lost=0 duplicated=0",
            total_events(&env.store).await
        );
    })
    .await
    .expect("test timed out");
    env.cleanup().await;
}
