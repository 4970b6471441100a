//! `nura bench` interrupted (Ctrl-C, or the SIGTERM of `timeout`) drops its scratch database
//! before it exits, and says it recorded nothing.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

async fn scratch_databases(admin: &sqlx::PgPool) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'nura_bench_%'")
        .fetch_all(admin)
        .await
        .expect("list databases")
        .into_iter()
        .collect()
}

#[tokio::test]
async fn an_interrupted_bench_drops_its_scratch_database() {
    for signal in ["INT", "TERM"] {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&nura_testkit::admin_database_url())
            .await
            .expect("connect to Postgres");
        let before = scratch_databases(&admin).await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nura"))
            .args(["bench", "--quick", "--only", "append"])
            .env("DATABASE_URL", nura_testkit::admin_database_url())
            .env("NATS_URL", nura_testkit::nats_url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start nura bench");

        // Wait until its scratch database exists (the run is under way).
        let deadline = Instant::now() + Duration::from_secs(60);
        let created = loop {
            let now = scratch_databases(&admin).await;
            if let Some(name) = now.difference(&before).next() {
                break name.clone();
            }
            assert!(
                Instant::now() < deadline,
                "nura bench created no scratch database within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let pid = child.id().expect("bench pid").to_string();
        let sent = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .unwrap_or_else(|_| panic!("nura bench did not exit within 30 s of SIG{signal}"))
            .expect("wait for nura bench");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .await
            .expect("read stderr");

        assert!(
            !status.success(),
            "an interrupted bench exited successfully"
        );
        assert!(
            stderr.contains("interrupted"),
            "stderr does not say the run was interrupted:\n{stderr}"
        );
        let after = scratch_databases(&admin).await;
        assert!(
            !after.contains(&created),
            "SIG{signal} left the scratch database {created} behind; stderr:\n{stderr}"
        );
        admin.close().await;
    }
}
