//! The `nura` binary's library: configuration, telemetry and the wiring of each subcommand.
//! Each part (gateway, relay, projector) runs under one cancellation token; `serve` runs them
//! all in one process and stops them together on SIGINT/SIGTERM.

mod bench;
mod bench_http;
pub mod config;
pub mod telemetry;

use anyhow::Context;
use config::{Cli, Command, DbArgs, NatsArgs};
use nura_store::EventStore;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Runs the chosen subcommand to completion.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate(db) => {
            let pool = connect_db(&db).await?;
            nura_store::MIGRATOR
                .run(&pool)
                .await
                .context("apply migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Token(args) => {
            let roles = args
                .roles
                .iter()
                .map(|r| nura_http::Role::parse(r).with_context(|| format!("unknown role {r:?}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let secret = args
                .jwt
                .jwt_secret
                .as_ref()
                .context("`nura token` signs with JWT_SECRET: set it")?;
            let token = nura_gateway::issue_token(
                secret,
                &args.jwt.jwt_issuer,
                &args.jwt.jwt_audience,
                &args.tenant,
                &args.user,
                &roles,
                Duration::from_secs(args.ttl_secs),
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Relay(args) => {
            let store = open_store(&args.db).await?;
            let js = connect_jetstream(&args.nats).await?;
            let shutdown = shutdown_on_signal();
            relay(store, js, args.nats.topology(), shutdown).await
        }
        Command::Projector(args) => {
            let store = open_store(&args.db).await?;
            let js = connect_jetstream(&args.nats).await?;
            let shutdown = shutdown_on_signal();
            projector(
                store,
                js,
                args.nats.topology(),
                Default::default(),
                shutdown,
            )
            .await
        }
        Command::Serve(args) => serve(*args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}

async fn serve(args: config::ServeArgs) -> anyhow::Result<()> {
    // Read the keys first: a bad key file should stop the start before anything connects.
    let mut gateway_config = args.gateway_config()?;
    // The projector workers of this process post their checkpoints here, so read-your-writes
    // waiters wake at their commit instead of at the next poll of `read.checkpoints`.
    let checkpoint_board = nura_store::CheckpointBoard::default();
    gateway_config.checkpoint_board = checkpoint_board.clone();
    let metrics = telemetry::install_metrics()?;
    let pool = connect_db(&args.db).await?;
    if !args.no_migrate {
        nura_store::MIGRATOR
            .run(&pool)
            .await
            .context("apply migrations")?;
    }
    // With group commit as configured (GROUP_COMMIT_LANES): this is where commands append.
    let store = open_store_with(pool, &args.db).await?;
    let nats = connect_nats(&args.nats).await?;
    let js = async_nats::jetstream::new(nats.clone());
    let shutdown = shutdown_on_signal();
    let tasks = TaskTracker::new();

    let listener = tokio::net::TcpListener::bind(args.listen_addr)
        .await
        .with_context(|| format!("bind {}", args.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
    let app = nura_gateway::app(
        store.clone(),
        nats.clone(),
        gateway_config,
        Some(metrics.clone()),
        vec![nura_projections::admin_router(store.clone())],
    );

    supervise(&tasks, &shutdown, "metrics upkeep", {
        let shutdown = shutdown.clone();
        async move {
            while !shutdown.is_cancelled() {
                metrics.run_upkeep();
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
            Ok(())
        }
    });
    supervise(
        &tasks,
        &shutdown,
        "relay",
        relay(
            store.clone(),
            js.clone(),
            args.nats.topology(),
            shutdown.clone(),
        ),
    );
    supervise(
        &tasks,
        &shutdown,
        "projectors",
        projector(
            store.clone(),
            js,
            args.nats.topology(),
            nura_projections::ProjectorConfig {
                checkpoint_board: Some(checkpoint_board),
                ..Default::default()
            },
            shutdown.clone(),
        ),
    );
    supervise(&tasks, &shutdown, "http", {
        let shutdown = shutdown.clone();
        async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("http server")
        }
    });
    tasks.close();
    tasks.wait().await;
    nats.drain().await.ok();
    tracing::info!("stopped");
    Ok(())
}

/// Spawns a part of the system; when it ends (error or not) everything shuts down, and the log
/// says which part ended and why.
fn supervise<F>(tasks: &TaskTracker, shutdown: &CancellationToken, name: &'static str, fut: F)
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        match fut.await {
            Ok(()) if shutdown.is_cancelled() => tracing::info!(task = name, "stopped"),
            Ok(()) => tracing::error!(task = name, "ended unexpectedly; shutting down"),
            Err(e) => tracing::error!(
                task = name,
                error = format!("{e:#}"),
                "failed; shutting down"
            ),
        }
        shutdown.cancel();
    });
}

async fn relay(
    store: EventStore,
    js: async_nats::jetstream::Context,
    topology: nura_nats::Topology,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    nura_nats::relay::Relay::new(
        store,
        js,
        topology,
        nura_nats::relay::RelayConfig::default(),
    )
    .run(shutdown)
    .await
}

async fn projector(
    store: EventStore,
    js: async_nats::jetstream::Context,
    topology: nura_nats::Topology,
    config: nura_projections::ProjectorConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    nura_projections::run(store, js, topology, config, shutdown).await
}

async fn connect_db(db: &DbArgs) -> anyhow::Result<PgPool> {
    pool_options(db.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(pg_options(&db.database_url)?)
        .await
        .context("connect to Postgres (DATABASE_URL)")
}

/// The pool every Nura process (and the benchmark standing in for one) queries through.
///
/// An acquired connection is handed out without sqlx's default health check, a round trip
/// (`Sync` → `ReadyForQuery`) before every statement: one of the three round trips of each
/// single-statement use of the pool. sqlx still pings every connection when it is released (it
/// has no switch for that), so a broken one is closed then. What that costs: after Postgres restarts, each idle pooled
/// connection fails the first statement given to it (one error per connection, which a client
/// retries with the same `command_id`) instead of being replaced before use.
pub(crate) fn pool_options(max_connections: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
}

/// Session settings of every Postgres connection Nura opens (the pool, and the group-commit,
/// relay and partition-lock connections made from its options).
///
/// Generic plans only: each statement is planned once per connection. Postgres' default plans
/// a statement again on each run while a plan for the run's values looks cheaper than the generic
/// one; it did so for a third of the projector's batch statements, spending as much CPU planning
/// them as running them. Every statement here reaches growing tables through their keys whatever
/// the plan (tests fix plans on empty tables and count the scans), so no value-specific plan
/// is needed.
pub(crate) fn pg_options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .context("parse DATABASE_URL")?
        .options([("plan_cache_mode", "force_generic_plan")]))
}

async fn open_store(db: &DbArgs) -> anyhow::Result<EventStore> {
    open_store_with(connect_db(db).await?, db).await
}

async fn open_store_with(pool: PgPool, db: &DbArgs) -> anyhow::Result<EventStore> {
    let store = if db.group_commit_lanes == 0 {
        EventStore::connect(pool).await
    } else {
        EventStore::connect_with_group_commit(
            pool,
            db.group_commit_lanes,
            db.group_commit_max_batch,
        )
        .await
    };
    store.context("open event store (did `nura migrate` run?)")
}

/// Connects to NATS; if it is down the client keeps retrying in the background, so commands
/// (which need only Postgres) keep working.
async fn connect_nats(nats: &NatsArgs) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("nura")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connect(&nats.nats_url)
        .await
        .context("connect to NATS (NATS_URL)")
}

async fn connect_jetstream(nats: &NatsArgs) -> anyhow::Result<async_nats::jetstream::Context> {
    Ok(async_nats::jetstream::new(connect_nats(nats).await?))
}

/// A token cancelled on the first SIGINT or SIGTERM after this call. The handlers are registered
/// here, before it returns: a signal that arrives before the spawned task first runs still
/// cancels the token instead of killing the process.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    #[cfg(unix)]
    let requested = {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &str| {
            signal(kind)
                .map_err(|e| tracing::warn!(error = %e, "cannot listen for {name}"))
                .ok()
        };
        let int = listen(SignalKind::interrupt(), "SIGINT");
        let term = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            tokio::select! {
                _ = received(int) => {}
                _ = received(term) => {}
            }
        }
    };
    #[cfg(not(unix))]
    let requested = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::spawn(async move {
        requested.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// The next delivery of a signal listened for; never, for one that could not be listened for.
#[cfg(unix)]
async fn received(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
