//! A real `redis-server` (Debian's package, 7.0) for tests of the shared state: each test starts its own on
//! `127.0.0.1` on a port it picks (`--port 0` would mean no TCP listener), with no persistence, and it is
//! killed when the [`Redis`] is dropped. [`Redis::stop`] and [`Redis::start_again`] let a test take it away and
//! bring it back on the same port.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's redis-server package puts the binary.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// A running redis-server; killed on drop.
pub struct Redis {
    /// The TCP port it listens on.
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// More redis-server arguments (e.g. `--requirepass`), kept for a restart.
    extra: Vec<String>,
}

impl Redis {
    /// Starts redis-server on a free port. Panics with the way to install it when it is missing: a test that
    /// needs a real Redis never passes without one.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Redis::start`] with more redis-server arguments, such as `["--requirepass", "pw"]`; `{port}` in one
    /// stands for the port picked (for `--tls-port {port}` after `--port 0`).
    pub fn start_with(extra: &[&str]) -> Self {
        assert!(
            Path::new(REDIS_SERVER).exists(),
            "{REDIS_SERVER} is missing: this test needs a real Redis. Install Debian's redis-server \
             (`apt-get update && apt-get install -y redis-server`, as .ci/run does) and run the test again"
        );
        let mut last = String::new();
        for _ in 0..5 {
            // Another process may take the port between the pick and redis-server's bind: then try another.
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("pick a free port");
            let mut redis = Self {
                port,
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                extra: extra.iter().map(|a| a.to_string()).collect(),
            };
            match redis.spawn() {
                Ok(()) => return redis,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new(REDIS_SERVER)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(self.extra.iter().map(|a| a.replace("{port}", &self.port.to_string())))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited: {status}"));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        Err("redis-server did not accept connections within 10 s".into())
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (as a crashed or unreachable Redis).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty (no persistence), as a restarted Redis.
    pub fn start_again(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("redis-server did not start again: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
