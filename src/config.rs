//! Configuration of every `nura` subcommand: flags with environment fallbacks, read once in
//! `main` and passed down. `std::env::var` appears nowhere else in the binary.

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use std::net::SocketAddr;
use std::time::Duration;

/// Nura: an event-sourced CQRS backend. Every part runs in one process (`serve`) or alone.
#[derive(Debug, Parser)]
#[command(name = "nura", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs everything in one process: migrations, gateway + command + query HTTP API, relay,
    /// projectors.
    Serve(Box<ServeArgs>),
    /// Applies the database migrations and exits.
    Migrate(DbArgs),
    /// Runs the relay alone (Postgres log → JetStream). One leader per database; extra
    /// instances stand by.
    Relay(RelayArgs),
    /// Runs a projector alone (JetStream → read models). Instances share partitions.
    Projector(ProjectorArgs),
    /// Prints a development JWT signed with the configured secret.
    Token(TokenArgs),
    /// Measures throughput and latency beside raw Postgres and JetStream floors (release build).
    Bench(BenchArgs),
}

/// Logging.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter (tracing env-filter syntax).
    #[arg(
        long,
        env = "RUST_LOG",
        default_value = "info,sqlx=warn",
        global = true
    )]
    pub log_filter: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: String,
}

/// Postgres.
#[derive(Debug, Args, Clone)]
pub struct DbArgs {
    /// Postgres URL of the event store and read models.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/nura"
    )]
    pub database_url: String,
    /// Maximum Postgres connections in this process's pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 32)]
    pub database_max_connections: u32,
    /// Group-commit lanes for appends (concurrent commands share a transaction); 0 turns group
    /// commit off.
    #[arg(long, env = "GROUP_COMMIT_LANES", default_value_t = 2)]
    pub group_commit_lanes: usize,
    /// Most commands in one group commit.
    #[arg(long, env = "GROUP_COMMIT_MAX_BATCH", default_value_t = 128)]
    pub group_commit_max_batch: usize,
}

/// NATS JetStream.
#[derive(Debug, Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// JetStream stream that carries events.
    #[arg(long, env = "NURA_STREAM", default_value = "EVENTS")]
    pub stream: String,
    /// First token of event subjects.
    #[arg(long, env = "NURA_SUBJECT_PREFIX", default_value = "events")]
    pub subject_prefix: String,
    /// Replicas of the stream (3 on a NATS cluster).
    #[arg(long, env = "NURA_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,
}

/// JWT settings.
#[derive(Debug, Args, Clone)]
pub struct JwtArgs {
    /// HS256 secret for development bearer tokens (at least 32 bytes); tokens without a `kid`
    /// are checked against it. Leave unset in production to accept only public-key tokens.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,
    /// Required `iss` claim.
    #[arg(long, env = "JWT_ISSUER", default_value = "nura")]
    pub jwt_issuer: String,
    /// Required `aud` claim.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "nura-api")]
    pub jwt_audience: String,
}

/// Production JWT keys, rate limits and CORS of the HTTP edge.
#[derive(Debug, Args, Clone)]
pub struct EdgeArgs {
    /// Public keys for tokens with a `kid`: `kid=path.pem`, comma-separated; RSA keys verify
    /// RS256 only, Ed25519 keys EdDSA only.
    #[arg(long, env = "JWT_PUBLIC_KEYS", value_delimiter = ',')]
    pub jwt_public_keys: Vec<String>,
    /// A JWKS URL (http://) consulted for unknown `kid`s.
    #[arg(long, env = "JWT_JWKS_URL", conflicts_with = "jwt_jwks_file")]
    pub jwt_jwks_url: Option<String>,
    /// A JWKS file, re-read like the URL.
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,
    /// Least seconds between two JWKS reads (an unknown `kid` triggers one at most this often).
    #[arg(long, env = "JWT_JWKS_REFRESH_SECS", default_value_t = 60)]
    pub jwt_jwks_refresh_secs: u64,
    /// The JWKS is re-read when older than this many seconds (retired keys stop working).
    #[arg(long, env = "JWT_JWKS_MAX_AGE_SECS", default_value_t = 300)]
    pub jwt_jwks_max_age_secs: u64,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds (at most 30).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 30)]
    pub jwt_leeway_secs: u64,
    /// Sustained requests per second per principal (0 = no limit).
    #[arg(long, env = "RATE_LIMIT_PER_PRINCIPAL_PER_SEC", default_value_t = nura_gateway::DEFAULT_PER_PRINCIPAL.per_sec)]
    pub rate_limit_per_principal_per_sec: u32,
    /// Burst per principal above the sustained rate.
    #[arg(long, env = "RATE_LIMIT_PER_PRINCIPAL_BURST", default_value_t = nura_gateway::DEFAULT_PER_PRINCIPAL.burst)]
    pub rate_limit_per_principal_burst: u32,
    /// Sustained requests per second per client address (IPv6: per /64; 0 = no limit).
    #[arg(long, env = "RATE_LIMIT_PER_IP_PER_SEC", default_value_t = nura_gateway::DEFAULT_PER_ADDRESS.per_sec)]
    pub rate_limit_per_ip_per_sec: u32,
    /// Burst per client address.
    #[arg(long, env = "RATE_LIMIT_PER_IP_BURST", default_value_t = nura_gateway::DEFAULT_PER_ADDRESS.burst)]
    pub rate_limit_per_ip_burst: u32,
    /// Behind a proxy that sets `X-Forwarded-For`: key clients by its last entry.
    #[arg(long, env = "TRUSTED_PROXY")]
    pub trusted_proxy: bool,
    /// Origins allowed cross-origin (comma-separated, or `*`); none = no CORS headers.
    #[arg(long, env = "CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,
    /// Methods allowed cross-origin.
    #[arg(
        long,
        env = "CORS_ALLOWED_METHODS",
        value_delimiter = ',',
        default_value = "GET,POST"
    )]
    pub cors_allowed_methods: Vec<String>,
    /// Request headers allowed cross-origin.
    #[arg(
        long,
        env = "CORS_ALLOWED_HEADERS",
        value_delimiter = ',',
        default_value = "authorization,content-type,idempotency-key,if-match,nura-after,x-api-key,x-request-id"
    )]
    pub cors_allowed_headers: Vec<String>,
}

/// `nura serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
    #[command(flatten)]
    pub edge: EdgeArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen_addr: SocketAddr,
    /// Skip applying migrations at start.
    #[arg(long, env = "NURA_NO_MIGRATE")]
    pub no_migrate: bool,
    /// How long a query with `?after=` waits for the projection, in milliseconds.
    #[arg(long, env = "READ_YOUR_WRITES_TIMEOUT_MS", default_value_t = 5000)]
    pub read_your_writes_timeout_ms: u64,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 256 * 1024)]
    pub body_limit_bytes: usize,
    /// Request timeout, in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Requests handled at once; more wait.
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,
}

/// `nura relay`.
#[derive(Debug, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// `nura projector`.
#[derive(Debug, Args)]
pub struct ProjectorArgs {
    /// The projector to run.
    #[arg(default_value = "conversations", value_parser = ["conversations"])]
    pub name: String,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
}

/// `nura token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Tenant claim.
    #[arg(long)]
    pub tenant: String,
    /// User (`sub`) claim.
    #[arg(long)]
    pub user: String,
    /// Roles (`admin`, `member`, `viewer`, `service`); repeat for several.
    #[arg(long = "role", default_value = "member")]
    pub roles: Vec<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
}

impl ServeArgs {
    /// The gateway's settings; reads the configured PEM files. Fails when a key is unusable or
    /// no way to verify tokens is configured.
    pub fn gateway_config(&self) -> anyhow::Result<nura_gateway::GatewayConfig> {
        use anyhow::Context;
        let e = &self.edge;
        let mut jwt_public_keys = vec![];
        for entry in e.jwt_public_keys.iter().filter(|s| !s.trim().is_empty()) {
            let (kid, path) = entry
                .split_once('=')
                .with_context(|| format!("JWT_PUBLIC_KEYS entry {entry:?} is not kid=path"))?;
            let pem = std::fs::read(path.trim())
                .with_context(|| format!("read the public key file {path:?}"))?;
            jwt_public_keys.push(nura_gateway::VerifyingKey::from_pem(kid.trim(), &pem)?);
        }
        let jwks = match (&e.jwt_jwks_url, &e.jwt_jwks_file) {
            (Some(url), _) => {
                anyhow::ensure!(
                    url.starts_with("http://"),
                    "JWT_JWKS_URL must be http:// (this build has no TLS client; use JWT_JWKS_FILE)"
                );
                Some(nura_gateway::JwksSource::Url(url.clone()))
            }
            (None, Some(path)) => Some(nura_gateway::JwksSource::File(path.clone())),
            (None, None) => None,
        };
        let jwt_secret = self
            .jwt
            .jwt_secret
            .clone()
            .unwrap_or_else(|| SecretString::from(""));
        anyhow::ensure!(
            !secrecy::ExposeSecret::expose_secret(&jwt_secret).is_empty()
                || !jwt_public_keys.is_empty()
                || jwks.is_some(),
            "no way to verify tokens: set JWT_SECRET (development), JWT_PUBLIC_KEYS, JWT_JWKS_URL or JWT_JWKS_FILE"
        );
        let mut c = nura_gateway::GatewayConfig::with_secret(jwt_secret);
        c.jwt_issuer = self.jwt.jwt_issuer.clone();
        c.jwt_audience = self.jwt.jwt_audience.clone();
        c.jwt_public_keys = jwt_public_keys;
        c.jwks = jwks;
        c.jwks_refresh_interval = Duration::from_secs(e.jwt_jwks_refresh_secs.max(1));
        c.jwks_max_age = Duration::from_secs(e.jwt_jwks_max_age_secs);
        c.jwt_leeway = Duration::from_secs(e.jwt_leeway_secs).min(nura_gateway::MAX_LEEWAY);
        c.rate_limit_per_principal = nura_gateway::RateLimit {
            per_sec: e.rate_limit_per_principal_per_sec,
            burst: e.rate_limit_per_principal_burst,
        };
        c.rate_limit_per_address = nura_gateway::RateLimit {
            per_sec: e.rate_limit_per_ip_per_sec,
            burst: e.rate_limit_per_ip_burst,
        };
        c.trust_forwarded_for = e.trusted_proxy;
        c.cors.allowed_origins = e
            .cors_allowed_origins
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        c.cors.allowed_methods = e.cors_allowed_methods.clone();
        c.cors.allowed_headers = e.cors_allowed_headers.clone();
        c.read_your_writes_timeout = Duration::from_millis(self.read_your_writes_timeout_ms);
        c.body_limit_bytes = self.body_limit_bytes;
        c.request_timeout = Duration::from_millis(self.request_timeout_ms);
        c.max_concurrent_requests = self.max_concurrent_requests;
        Ok(c)
    }
}

impl NatsArgs {
    /// The JetStream topology.
    pub fn topology(&self) -> nura_nats::Topology {
        nura_nats::Topology {
            stream: self.stream.clone(),
            subject_prefix: self.subject_prefix.clone(),
            replicas: self.stream_replicas,
        }
    }
}

/// `nura bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Postgres URL of a role that may create databases (a scratch database is created and
    /// dropped).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Smaller sizes: finishes within about two minutes.
    #[arg(long)]
    pub quick: bool,
    /// Also write the rows as a JSON list to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Run only these phases (comma-separated: `append`, `backlog`, `http`); the raw floors
    /// always run. `http` also runs `append`, whose concurrency-32 rate it is compared with.
    #[arg(long, value_delimiter = ',', value_parser = ["append", "backlog", "http"])]
    pub only: Vec<String>,
    /// Group-commit lanes of the append phase (as `nura serve`'s `GROUP_COMMIT_LANES`).
    #[arg(long, env = "GROUP_COMMIT_LANES", default_value_t = 2)]
    pub group_commit_lanes: usize,
    /// Most commands in one group commit (as `nura serve`'s `GROUP_COMMIT_MAX_BATCH`).
    #[arg(long, env = "GROUP_COMMIT_MAX_BATCH", default_value_t = 128)]
    pub group_commit_max_batch: usize,
}

impl BenchArgs {
    /// Whether the bench runs `phase` (see `--only`).
    pub fn runs(&self, phase: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|p| p == phase)
            || (phase == "append" && self.only.iter().any(|p| p == "http"))
    }
}
