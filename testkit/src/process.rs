//! Private Postgres and NATS server processes for fault tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; a race with another process is possible
/// but unlikely on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind port 0")
        .local_addr()
        .unwrap()
        .port()
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn pg_bin(tool: &str) -> PathBuf {
    for dir in [
        "/usr/lib/postgresql/15/bin",
        "/usr/lib/postgresql/16/bin",
        "/usr/lib/postgresql/17/bin",
    ] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(tool)
}

/// A private PostgreSQL server on a free port, data in a temp dir; killed and removed on drop.
/// As root, it runs as the `postgres` OS user (initdb and postgres refuse root).
pub struct PgProcess {
    /// The server's port.
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl PgProcess {
    /// Initialises a cluster and starts it; panics loudly if Postgres binaries are missing.
    pub fn start() -> PgProcess {
        let dir = temp_dir("nura_pg");
        let data = dir.join("data");
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir));
        }
        let mut init = sudo_postgres(pg_bin("initdb"));
        init.args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(&mut init);
        let mut pg = PgProcess {
            port: free_port(),
            dir,
            child: None,
        };
        pg.restart();
        pg
    }

    /// The admin URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again) on the same port and data; waits until it accepts connections.
    pub fn restart(&mut self) {
        let data = self.dir.join("data");
        let mut cmd = sudo_postgres(pg_bin("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start private postgres"));
        wait_for_port(self.port, Duration::from_secs(30));
        // The port opens before recovery ends: wait until a query works.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(pg_bin("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "private postgres did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the postmaster with SIGKILL (a crash; restart recovers from WAL).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Orphaned backends hold the port and shared memory briefly; wait until they are gone.
            let _ = Command::new("pkill")
                // `--`: the pattern starts with `-` and would otherwise be read as an option.
                .args(["-9", "-f", "--", &format!("-p {}", self.port)])
                .status();
            wait_port_closed(self.port, Duration::from_secs(30));
        }
    }

    /// Stops the server in immediate mode (`pg_ctl stop -m immediate`: no checkpoint, recovery
    /// on start). Through `pg_ctl` because the child may be a `runuser` wrapper that does not
    /// pass signals on to the postmaster.
    pub fn stop_immediate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut stop = sudo_postgres(pg_bin("pg_ctl"));
            stop.args(["stop", "-m", "immediate", "-w", "-D"])
                .arg(self.dir.join("data"));
            run(&mut stop);
            let _ = c.wait();
            wait_port_closed(self.port, Duration::from_secs(30));
        }
    }
}

impl Drop for PgProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private nats-server with JetStream on a free port, store in a temp dir.
pub struct NatsProcess {
    /// The client port.
    pub port: u16,
    /// The monitoring port.
    pub monitor_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl NatsProcess {
    /// Starts a server; panics loudly if nats-server is missing.
    pub fn start() -> NatsProcess {
        let mut n = NatsProcess {
            port: free_port(),
            monitor_port: free_port(),
            dir: temp_dir("nura_nats"),
            child: None,
        };
        n.restart();
        n
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) with the same ports and store; waits until JetStream is up.
    pub fn restart(&mut self) {
        let bin = [
            "/usr/sbin/nats-server",
            "/usr/bin/nats-server",
            "/usr/local/bin/nats-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nats-server");
        let child = Command::new(bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor_port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nats-server is required for this test: {e}"));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_ok(self.monitor_port, "/healthz?js-enabled-only=true") {
            assert!(
                Instant::now() < deadline,
                "private nats-server did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            wait_port_closed(self.port, Duration::from_secs(10));
        }
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sudo_postgres(bin: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_for_port(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} did not open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_port_closed(port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}
