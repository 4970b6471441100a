//! Acknowledgements: the runtime creates consumers that ack cumulatively (one ack per committed
//! batch), and keeps acking message by message a consumer that was created with explicit acks
//! before (JetStream cannot change a consumer's ack policy). Either way, once the read model has
//! caught up nothing is left pending on the consumer.

mod common;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use common::*;
use nura_projections::{ProjectorConfig, conversations};
use nura_store::{CheckpointBoard, CommitToken};
use std::time::Duration;

/// Runs one worker per partition over some traffic and returns, per partition, the consumer's ack
/// policy, messages still unacknowledged and messages not yet delivered, once caught up.
async fn drain_and_inspect(env: &Env) -> Vec<(AckPolicy, u64, u64)> {
    let counts = append_traffic(&env.store, 20, 600, "acme").await;
    let heads = partition_heads(&env.store).await;
    Publisher::new(env).publish_new(&env.store).await;
    let board = CheckpointBoard::default();
    let config = ProjectorConfig {
        checkpoint_board: Some(board.clone()),
        ..test_config()
    };
    let running = spawn_workers(env.workers(&config));
    wait_caught_up(&env.store, &heads, Duration::from_secs(60)).await;
    // Every committed checkpoint was posted to the process's board too (read-your-writes
    // waiters in the process watch it instead of the table).
    for (&partition, &position) in &heads {
        let token = CommitToken {
            position,
            partition,
        };
        assert!(
            board
                .subscribe()
                .borrow()
                .passed(conversations::NAME, token),
            "partition {partition}: checkpoint not posted"
        );
    }
    let stream = env.topology.ensure_stream(&env.js).await.expect("stream");
    // The last acks travel after the commit that made the checkpoint visible: give them a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let states = loop {
        let mut states = Vec::new();
        for p in 0..env.store.partitions() {
            let name = format!("{}_p{p}", conversations::NAME);
            let info = stream.consumer_info(&name).await.expect("consumer info");
            states.push((
                info.config.ack_policy,
                info.num_ack_pending as u64,
                info.num_pending,
            ));
        }
        let settled = states.iter().all(|(_, unacked, _)| *unacked == 0);
        if settled || tokio::time::Instant::now() >= deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    running.stop().await;
    assert_equals_fold(&env.store, &counts).await;
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_the_runtime_creates_ack_whole_batches_and_leave_nothing_pending() {
    let env = Env::new().await;
    let states = tokio::time::timeout(Duration::from_secs(90), drain_and_inspect(&env))
        .await
        .expect("test timed out");
    for (p, (policy, unacked, undelivered)) in states.into_iter().enumerate() {
        assert_eq!(policy, AckPolicy::All, "partition {p}: cumulative acks");
        assert_eq!(unacked, 0, "partition {p}: messages left unacknowledged");
        assert_eq!(undelivered, 0, "partition {p}: messages never delivered");
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_created_with_explicit_acks_gets_every_message_acked() {
    let env = Env::new().await;
    let stream = env.topology.ensure_stream(&env.js).await.expect("stream");
    for p in 0..env.store.partitions() {
        let name = format!("{}_p{p}", conversations::NAME);
        stream
            .create_consumer(pull::Config {
                durable_name: Some(name),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                // Long enough that a message left unacked stays pending while the test looks.
                ack_wait: Duration::from_secs(60),
                max_deliver: -1,
                filter_subject: env.topology.partition_filter(p),
                ..Default::default()
            })
            .await
            .expect("explicit consumer");
    }
    let states = tokio::time::timeout(Duration::from_secs(90), drain_and_inspect(&env))
        .await
        .expect("test timed out");
    for (p, (policy, unacked, undelivered)) in states.into_iter().enumerate() {
        assert_eq!(
            policy,
            AckPolicy::Explicit,
            "partition {p}: the policy it was created with"
        );
        assert_eq!(unacked, 0, "partition {p}: messages left unacknowledged");
        assert_eq!(undelivered, 0, "partition {p}: messages never delivered");
    }
    env.cleanup().await;
}
