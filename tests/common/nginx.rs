//! A real nginx (Debian's nginx-light, 1.22) as an upstream for tests: real servers refuse what our own mock
//! forgives (nginx 1.22 answers 400 to an HTTP/2 request carrying `host` beside `:authority`).
//!
//! Everything lives in a temp dir (config, pid, logs, temp paths), nginx runs in the foreground as one process
//! (`daemon off; master_process off;`) and is killed when the [`Nginx`] is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's nginx packages put the binary.
pub const NGINX: &str = "/usr/sbin/nginx";

/// A running nginx; killed on drop.
pub struct Nginx {
    /// One port per server block, in the order given to [`Nginx::start`].
    pub ports: Vec<u16>,
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with one `server { ... }` block per entry of `servers`, inside an `http` block whose logs
    /// and temp paths are in a fresh temp dir. In each block, `{port}` is replaced by a free port picked for
    /// it and `{dir}` by the temp dir; `files` (name, contents) are written into the temp dir first (TLS
    /// certificates and keys). Waits until every port accepts.
    ///
    /// Panics with the way to install nginx when it is missing: a test that needs a real nginx never passes
    /// without one.
    pub fn start(files: &[(&str, &str)], servers: &[&str]) -> Self {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: this test needs a real nginx as the upstream. Install Debian's nginx-light \
             (`apt-get update && apt-get install -y nginx-light`, as .ci/run does) and run the test again"
        );
        // nginx refuses port 0, so a port is picked here and handed over. Another process may take it in
        // between: then nginx exits at once and is started again on fresh ports.
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(files, servers) {
                Ok(nginx) => return nginx,
                Err(e) => last_error = e,
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    fn try_start(files: &[(&str, &str)], servers: &[&str]) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let d = dir.path().display().to_string();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).map_err(|e| e.to_string())?;
        }
        // Held until all are picked, so no two blocks get the same port.
        let held: Vec<TcpListener> = servers
            .iter()
            .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        drop(held);
        let blocks: String = servers
            .iter()
            .zip(&ports)
            .map(|(s, p)| s.replace("{port}", &p.to_string()).replace("{dir}", &d))
            .collect::<Vec<_>>()
            .join("\n");
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n{blocks}\n}}\n"
        );
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {NGINX}: {e}"))?;
        let mut nginx = Self { ports, child, dir };
        let end = Instant::now() + Duration::from_secs(10);
        for port in nginx.ports.clone() {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            loop {
                if let Ok(Some(status)) = nginx.child.try_wait() {
                    return Err(format!("nginx exited ({status}): {}", nginx.error_log()));
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if Instant::now() > end {
                    return Err(format!(
                        "nginx did not accept on {addr} within 10 s: {}",
                        nginx.error_log()
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(nginx)
    }

    /// The temp dir holding the config, logs and `files`.
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// nginx's error log so far (it says why a request was refused).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
