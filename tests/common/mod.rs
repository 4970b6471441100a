//! A `nura serve` child process for the end-to-end tests: a fresh database, its own JetStream
//! stream, a free port, every line it logs kept for inspection, killed when dropped.

use nura_testkit::{TestDb, free_port, unique_name};
use reqwest::StatusCode;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_nura");

/// A running `nura serve`; killed when the test ends, however it ends.
pub struct Serve {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    logs: Arc<Mutex<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Serve {
    /// Starts `nura serve` on `db` with `settings` (environment variables, applied after the
    /// defaults so they override them) and waits until `/readyz` answers 200.
    pub async fn start(db: &TestDb, settings: &[(&str, String)]) -> Serve {
        let port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env("DATABASE_URL", &db.url)
            .env("NATS_URL", nura_testkit::nats_url())
            .env("NURA_STREAM", unique_name("EV"))
            .env("NURA_SUBJECT_PREFIX", unique_name("t"))
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_MAX_CONNECTIONS", "8");
        for (k, v) in settings {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start nura serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn tokio::io::AsyncRead + Unpin + Send>; 2] = [
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        // Drain both pipes continuously: a full pipe would block the server's logging.
        for mut pipe in pipes {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = logs.lock() {
                        l.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        let server = Serve {
            child,
            base: format!("http://127.0.0.1:{port}"),
            logs,
        };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", server.base)).send().await
                && r.status() == StatusCode::OK
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "nura serve never became ready; its output:\n{}",
                server.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Everything the server wrote so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// A development token from `nura token`, signed with `secret`.
pub async fn token(secret: &str, tenant: &str, user: &str, role: &str) -> String {
    let out = Command::new(BIN)
        .args(["token", "--tenant", tenant, "--user", user, "--role", role])
        .env("JWT_SECRET", secret)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run nura token");
    assert!(
        out.status.success(),
        "nura token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
