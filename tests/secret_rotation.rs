//! Issue 9: secret files are re-read within 10 s of changing on disk, without a signal, the way a Kubernetes
//! Secret volume changes them; a broken new file is refused and logged and the old value kept.

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use zapsign_proxy::mock::{MockConfig, MockZapSign, DEMO_ORGANIZATION_ID, DEMO_PASSWORD, DEMO_USERNAME};

/// The contract's bound from a change on disk to its use.
const WITHIN: Duration = Duration::from_secs(10);

/// A directory laid out as the kubelet lays out a Secret volume: each key is a symlink `name -> ..data/name`,
/// `..data` is a symlink to a timestamped directory holding the files, and an update writes a new timestamped
/// directory, renames a new `..data` symlink over the old one (one atomic step), then removes the old directory.
struct SecretVolume {
    dir: tempfile::TempDir,
    version: u32,
}

impl SecretVolume {
    fn new(files: &[(&str, &str)]) -> Self {
        let mut volume = Self {
            dir: tempfile::tempdir().unwrap(),
            version: 0,
        };
        volume.update(files);
        for (name, _) in files {
            symlink(Path::new("..data").join(name), volume.path(name)).unwrap();
        }
        volume
    }

    /// The path the proxy's config names for `name`.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Swaps in new contents for every key, as the kubelet does.
    fn update(&mut self, files: &[(&str, &str)]) {
        let old = format!("..2026_12_02_10_00_{:02}.{}", self.version, 1000 + self.version);
        self.version += 1;
        let new = format!("..2026_12_02_10_00_{:02}.{}", self.version, 1000 + self.version);
        std::fs::create_dir(self.dir.path().join(&new)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.path().join(&new).join(name), content).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
        let _ = std::fs::remove_dir_all(self.dir.path().join(old));
    }
}

/// A request through the proxy with `key` as the client key; its status.
async fn status_with_key(addr: std::net::SocketAddr, key: &str) -> u16 {
    let mut req = get(addr, "/api/v1/docs/");
    req.headers_mut()
        .insert("proxy-authorization", format!("Bearer {key}").parse().unwrap());
    send(addr, req).await.status.as_u16()
}

/// Polls `check` (async) every 50 ms until it holds or `deadline` passes; returns the time it took, if it held.
async fn time_until<F, Fut>(deadline: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < deadline {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_rotated_in_a_kubernetes_volume_are_applied_without_a_signal() {
    let mock = MockZapSign::start(MockConfig::default()).await.unwrap();
    let mut volume = SecretVolume::new(&[("password", DEMO_PASSWORD), ("client-keys", "old-client-key\n")]);
    let text = format!(
        "[upstream]\nurl = \"{}\"\n[auth]\norganization_id = \"{DEMO_ORGANIZATION_ID}\"\nusername = \"{DEMO_USERNAME}\"\n\
         password_file = \"{}\"\n[access]\nclient_keys_file = \"{}\"\n[log]\nformat = \"json\"\n",
        mock.url(),
        volume.path("password").display(),
        volume.path("client-keys").display(),
    );
    let proxy = Subprocess::start(&text, &[]);
    let state = mock.state.clone();
    assert!(wait_until(WITHIN, || state.logins.load(Ordering::SeqCst) == 1).await);
    assert_eq!(status_with_key(proxy.addr, "old-client-key").await, 200);

    // The account's password changes: ZapSign first, then the Secret. No signal is sent.
    mock.state.update_config(|c| c.password = "rotated-password-2".into());
    volume.update(&[
        ("password", "rotated-password-2\n"),
        ("client-keys", "old-client-key\n"),
    ]);
    let took = time_until(WITHIN, || {
        let state = state.clone();
        async move { state.logins.load(Ordering::SeqCst) == 2 }
    })
    .await;
    let took = took.unwrap_or_else(|| panic!("no login with the new password; logs: {}", proxy.log_text()));
    eprintln!("password rotation applied after {took:?}");
    assert_eq!(state.last_login_password().as_deref(), Some("rotated-password-2"));
    assert_eq!(status_with_key(proxy.addr, "old-client-key").await, 200);

    // The client keys change: the old key is refused and the new one admitted.
    volume.update(&[
        ("password", "rotated-password-2\n"),
        ("client-keys", "new-client-key\n"),
    ]);
    let addr = proxy.addr;
    let took = time_until(WITHIN, || async move {
        status_with_key(addr, "old-client-key").await == 407 && status_with_key(addr, "new-client-key").await == 200
    })
    .await;
    let took = took.unwrap_or_else(|| panic!("client keys not rotated; logs: {}", proxy.log_text()));
    eprintln!("client key rotation applied after {took:?}");

    // A broken rotation (an empty password, a key file with no key) is refused and logged; the old values stay.
    volume.update(&[("password", ""), ("client-keys", "# nothing yet\n")]);
    let lines = proxy.lines.clone();
    let refused = wait_until(WITHIN, || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("reload rejected") && l.contains("auth.password_file"))
    })
    .await;
    assert!(refused, "no log line about the refused files: {}", proxy.log_text());
    assert_eq!(status_with_key(proxy.addr, "new-client-key").await, 200);
    assert_eq!(status_with_key(proxy.addr, "old-client-key").await, 407);
    mock.state.revoke_all();
    assert_eq!(status_with_key(proxy.addr, "new-client-key").await, 200);
    assert_eq!(state.last_login_password().as_deref(), Some("rotated-password-2"));
    assert!(
        !proxy.log_text().contains("rotated-password-2"),
        "a password reached the logs"
    );
}
