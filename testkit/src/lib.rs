//! Test support for Nura's integration tests.
//!
//! * [`TestDb`]: a fresh database on the shared Postgres (`DATABASE_URL`, default
//!   `postgres://postgres@127.0.0.1:5432/test`) with every migration applied; dropped afterwards.
//! * [`nats_url`] / [`unique_name`]: the shared NATS (`NATS_URL`) and names that keep parallel
//!   tests apart (each test uses its own JetStream stream and subject prefix).
//! * [`PgProcess`] / [`NatsProcess`]: private servers on free ports in temp dirs, for tests that
//!   stop, kill or restart them.
//!
//! A server that is not reachable fails the test loudly: nothing here ever skips.

mod process;

pub use process::{NatsProcess, PgProcess, free_port};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use std::path::Path;
use std::str::FromStr;

/// The Postgres URL tests create their databases from.
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The NATS URL of the shared server.
pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A short random name for streams, subjects, databases: `<prefix>_<12 hex>`.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Logs to the test output once per process (`RUST_LOG`, default `warn`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Connects to the shared NATS or fails the test with a clear message.
pub async fn nats_client() -> async_nats::Client {
    let url = nats_url();
    async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("NATS is required at {url} (set NATS_URL): {e}"))
}

/// Applies every migration in `migrations/` to the database behind `pool`.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    sqlx::migrate::Migrator::new(dir).await?.run(pool).await?;
    Ok(())
}

/// A fresh, migrated database; dropped (forcibly) when the value is dropped.
pub struct TestDb {
    /// A pool on the fresh database.
    pub pool: PgPool,
    /// The URL of the fresh database.
    pub url: String,
    name: String,
    admin: PgConnectOptions,
}

impl TestDb {
    /// Creates and migrates a fresh database on the shared server.
    pub async fn new() -> TestDb {
        Self::on(&admin_database_url()).await
    }

    /// Creates and migrates a fresh database on the server at `admin_url`.
    pub async fn on(admin_url: &str) -> TestDb {
        let admin = PgConnectOptions::from_str(admin_url).expect("DATABASE_URL parses");
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!("Postgres is required at {admin_url} (set DATABASE_URL): {e}")
        });
        let name = unique_name("nura_t");
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create test database");
        conn.close().await.ok();
        let opts = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(20)
            .connect_with(opts.clone())
            .await
            .expect("connect to test database");
        migrate(&pool).await.expect("migrate test database");
        let url = format!(
            "{}{}",
            admin_url
                .rsplit_once('/')
                .map_or(admin_url, |(base, _)| base),
            "/"
        ) + &name;
        TestDb {
            pool,
            url,
            name,
            admin,
        }
    }

    /// A new pool on the same database with `max` connections.
    pub async fn pool_with(&self, max: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max)
            .connect(&self.url)
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop is synchronous and may run on a runtime thread that other tasks (still holding
        // connections) need: never wait for the pool; FORCE ends its connections server-side,
        // and the whole clean-up is bounded.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    let cleanup = async {
                        if let Ok(mut c) = admin.connect().await {
                            let _ = c
                                .execute(sqlx::AssertSqlSafe(format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                )))
                                .await;
                        }
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(15), cleanup).await;
                });
            }
        })
        .join()
        .ok();
    }
}
