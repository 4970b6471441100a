//! The command handler against a real, fresh Postgres database.

use nura_commands::{CommandError, CommandHandler, CommandMeta, IdempotencyKey};
use nura_domain::conversation::{Actor, ConversationError, stream_id};
use nura_store::{EventStore, StoreError};
use nura_testkit::TestDb;
use std::time::Duration;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(60);

fn meta(tenant: &str, key: Option<&str>) -> CommandMeta {
    CommandMeta {
        actor: Actor {
            tenant_id: tenant.into(),
            user_id: "alice".into(),
        },
        correlation_id: "req-1".into(),
        idempotency_key: key.map(|k| IdempotencyKey::parse(k).expect("valid key")),
        expected_version: None,
        causation_id: None,
    }
}

async fn handler(db: &TestDb) -> CommandHandler {
    CommandHandler::new(EventStore::connect(db.pool.clone()).await.expect("store"))
}

#[tokio::test]
async fn a_conversation_is_started_messaged_and_archived_with_metadata_from_the_caller() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let m = meta("acme", None);
        let started = h.start_conversation(&m, "  Hello ").await.unwrap();
        assert_eq!(started.version, 1);
        let posted = h
            .post_message(&m, started.conversation_id, "hi")
            .await
            .unwrap();
        assert_eq!(posted.version, 2);
        assert!(posted.commit.position > started.commit.position);
        let archived = h
            .archive_conversation(&m, started.conversation_id)
            .await
            .unwrap();
        assert_eq!(archived.version, 3);

        let events = h
            .store()
            .read_stream(&stream_id(started.conversation_id), 0, 100)
            .await
            .unwrap();
        let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "ConversationStarted",
                "MessagePosted",
                "ConversationArchived"
            ]
        );
        assert_eq!(events[1].event_id, posted.event_ids[0]);
        for e in &events {
            assert_eq!(e.metadata.tenant_id, "acme");
            assert_eq!(e.metadata.actor, "alice");
            assert_eq!(e.metadata.correlation_id, "req-1");
        }
        assert_eq!(events[0].payload["title"], "Hello");
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn archiving_twice_appends_nothing_and_returns_the_current_commit() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let m = meta("acme", None);
        let c = h.start_conversation(&m, "t").await.unwrap();
        let first = h.archive_conversation(&m, c.conversation_id).await.unwrap();
        let second = h.archive_conversation(&m, c.conversation_id).await.unwrap();
        assert!(second.event_ids.is_empty());
        assert_eq!(second.commit, first.commit);
        assert_eq!(second.version, 2);
        let stored = h
            .store()
            .stream_version(&stream_id(c.conversation_id))
            .await;
        assert_eq!(stored.unwrap(), 2);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_repeated_command_returns_the_first_result_and_stores_one_event() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let c = h
            .start_conversation(&meta("acme", Some("start-1")), "t")
            .await
            .unwrap();
        let again = h
            .start_conversation(&meta("acme", Some("start-1")), "t")
            .await
            .unwrap();
        assert_eq!(again.conversation_id, c.conversation_id);
        assert!(again.replayed);

        let m = meta("acme", Some("post-1"));
        let first = h.post_message(&m, c.conversation_id, "hi").await.unwrap();
        // Even after the conversation is archived, the repeat answers with the first result.
        h.archive_conversation(&meta("acme", None), c.conversation_id)
            .await
            .unwrap();
        let repeat = h.post_message(&m, c.conversation_id, "hi").await.unwrap();
        assert_eq!(repeat.event_ids, first.event_ids);
        assert_eq!(repeat.commit, first.commit);
        let stored = h
            .store()
            .stream_version(&stream_id(c.conversation_id))
            .await;
        assert_eq!(stored.unwrap(), 3);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn the_same_key_with_another_body_is_refused_and_keys_are_scoped_by_tenant() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let c = h
            .start_conversation(&meta("acme", Some("k")), "one")
            .await
            .unwrap();
        let err = h
            .start_conversation(&meta("acme", Some("k")), "two")
            .await
            .unwrap_err();
        assert!(
            matches!(err, CommandError::Store(StoreError::IdempotencyMismatch(_))),
            "{err:?}"
        );
        // Another tenant using the same key gets its own conversation, not acme's.
        let other = h
            .start_conversation(&meta("evil", Some("k")), "one")
            .await
            .unwrap();
        assert_ne!(other.conversation_id, c.conversation_id);
        assert!(!other.replayed);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn another_tenant_cannot_touch_a_conversation() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let c = h
            .start_conversation(&meta("acme", None), "t")
            .await
            .unwrap();
        let evil = meta("evil", None);
        let err = h
            .post_message(&evil, c.conversation_id, "x")
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            CommandError::Rejected(ConversationError::ForeignTenant)
        ));
        let err = h
            .archive_conversation(&evil, c.conversation_id)
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            CommandError::Rejected(ConversationError::ForeignTenant)
        ));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_stale_if_match_is_a_conflict_with_both_versions() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let c = h
            .start_conversation(&meta("acme", None), "t")
            .await
            .unwrap();
        let mut m = meta("acme", None);
        m.expected_version = Some(7);
        let err = h
            .post_message(&m, c.conversation_id, "x")
            .await
            .unwrap_err();
        match err {
            CommandError::Conflict {
                expected, actual, ..
            } => assert_eq!((expected, actual), (7, 1)),
            other => panic!("expected a conflict, got {other:?}"),
        }
        m.expected_version = Some(1);
        h.post_message(&m, c.conversation_id, "x").await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn concurrent_posts_keep_versions_contiguous_and_losers_get_conflicts() {
    timeout(LIMIT, async {
        let db = TestDb::new().await;
        let h = handler(&db).await;
        let c = h
            .start_conversation(&meta("acme", None), "t")
            .await
            .unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let h = h.clone();
                tokio::spawn(async move {
                    h.post_message(&meta("acme", None), c.conversation_id, &format!("m{i}"))
                        .await
                })
            })
            .collect();
        let (mut ok, mut conflicts) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(CommandError::Conflict { .. }) => conflicts += 1,
                Err(e) => panic!("unexpected error {e:?}"),
            }
        }
        let events = h
            .store()
            .read_stream(&stream_id(c.conversation_id), 0, 100)
            .await
            .unwrap();
        let versions: Vec<i64> = events.iter().map(|e| e.stream_version).collect();
        assert_eq!(versions, (1..=1 + ok as i64).collect::<Vec<_>>());
        println!(
            "verdict: sent=16 acknowledged={ok} conflicts={conflicts} stored={}",
            events.len() - 1
        );
        assert_eq!(ok + conflicts, 16);
    })
    .await
    .expect("test timed out");
}
