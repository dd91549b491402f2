//! Configuration reload: the new configuration, already validated and with its secret files re-read, is applied
//! to the running proxy without a restart. What can change live: the access rules and client keys, the login
//! credentials (a fresh login follows), the static API token, and the TLS certificate. A new TLS identity that
//! does not load rejects the whole reload; keys that need a restart are named in a warning.
//!
//! Two things trigger a reload, and both take the one path ([`reload_on_change`] loads, [`apply_all`] applies):
//! SIGHUP, and a secret file whose content changed on disk. The second exists for Kubernetes: a Secret volume
//! is updated in place (a new timestamped directory, then a `..data` symlink renamed over the old one) and the
//! distroless image has no shell to send a signal from.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::config::{Auth, Config, ConfigError, ServerTls};
use crate::proxy::Proxy;
use crate::server::TlsCell;

/// New configurations for a running proxy; send one after re-reading the file.
pub type Reloads = mpsc::Receiver<Config>;

/// What a reload can reach.
pub(crate) struct ReloadTargets {
    /// Access policy, tokens and credentials: applied by [`Proxy::reload`].
    pub(crate) proxy: Arc<Proxy>,
    /// The caller-facing TLS identity, when the proxy serves HTTPS.
    pub(crate) tls: TlsCell,
}

/// Applies each configuration received until the channel closes.
pub(crate) async fn apply_all(mut running: Config, mut reloads: Reloads, targets: ReloadTargets) {
    while let Some(next) = reloads.recv().await {
        match apply(&running, &next, &targets).await {
            Ok(()) => {
                info!("configuration reloaded");
                running = next;
            }
            Err(e) => error!("reload rejected, the running configuration stays: {e}"),
        }
    }
}

async fn apply(running: &Config, next: &Config, targets: &ReloadTargets) -> Result<(), ConfigError> {
    // Everything that can fail is prepared before anything changes: the TLS identity here, the static token
    // inside `Proxy::reload` before it changes anything, and the identity is stored only once that succeeded.
    let tls = match (&targets.tls, &next.server.tls) {
        (Some(_), Some(files)) => Some(acceptor(files)?),
        _ => None,
    };
    for key in needs_restart(running, next) {
        warn!(key, "changed in the file but takes effect only after a restart");
    }
    targets.proxy.reload(running, next).await?;
    if let (Some(cell), Some(acceptor)) = (&targets.tls, tls) {
        cell.store(Arc::new(acceptor));
    }
    Ok(())
}

/// Keys whose change a reload cannot apply.
fn needs_restart(a: &Config, b: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    check("server.listen", a.server.listen != b.server.listen);
    check("server.workers", a.server.workers != b.server.workers);
    check("server.tls_cert_file", a.server.tls.is_some() != b.server.tls.is_some());
    check(
        "server.header_read_timeout",
        a.server.header_read_timeout != b.server.header_read_timeout,
    );
    check(
        "server.max_connections",
        a.server.max_connections != b.server.max_connections,
    );
    check(
        "server.shutdown_grace",
        a.server.shutdown_grace != b.server.shutdown_grace,
    );
    check("admin.listen", a.admin.listen != b.admin.listen);
    check("upstream.url", a.upstream.url.text != b.upstream.url.text);
    check(
        "upstream.connect_timeout",
        a.upstream.connect_timeout != b.upstream.connect_timeout,
    );
    check(
        "upstream.response_timeout",
        a.upstream.response_timeout != b.upstream.response_timeout,
    );
    check("upstream.ca_file", a.upstream.ca_file != b.upstream.ca_file);
    check("auth.mode", a.auth.mode.name() != b.auth.mode.name());
    if let (Auth::Jwt(old), Auth::Jwt(new)) = (&a.auth.mode, &b.auth.mode) {
        check("auth.url", old.url.text != new.url.text);
        check("auth.refresh_margin", old.refresh_margin != new.refresh_margin);
    }
    check("auth.replay_buffer", a.auth.replay_buffer != b.auth.replay_buffer);
    check("auth.timeout", a.auth.timeout != b.auth.timeout);
    check("pacing.*", a.pacing != b.pacing);
    check("shared.redis_url", a.shared.is_some() != b.shared.is_some());
    check(
        "shared.replicas",
        a.shared.as_ref().map(|s| s.replicas) != b.shared.as_ref().map(|s| s.replicas),
    );
    check("log.format", a.log.format != b.log.format);
    check("log.level", a.log.level != b.log.level);
    keys
}

/// How often the secret files are compared with what was last loaded. The contract allows 10 s from a change
/// on disk to its use; reading a few small files every 2 s costs nothing worth measuring.
pub const SECRET_POLL: Duration = Duration::from_secs(2);

/// The secret files `config` names that are re-read within 10 s of changing on disk, without a signal.
/// `upstream.ca_file` is not one: a new CA needs a restart. Nor is `shared.key_file`: the contract reads it at
/// start and on SIGHUP only (a key that changed on one replica alone would make its tokens unreadable to the
/// others), and a SIGHUP re-reads it with everything else.
pub fn secret_files(config: &Config) -> Vec<PathBuf> {
    let auth_file = match &config.auth.mode {
        Auth::Jwt(jwt) => &jwt.password_file,
        Auth::Static(token) => &token.api_token_file,
    };
    let tls_files = config.server.tls.iter().flat_map(|tls| [&tls.cert_file, &tls.key_file]);
    let redis_password_file = config.shared.iter().flat_map(|shared| &shared.password_file);
    auth_file
        .iter()
        .chain(&config.access.client_keys_file)
        .chain(tls_files)
        .chain(redis_password_file)
        .cloned()
        .collect()
}

/// What each watched file holds: a digest of its content, `None` while it cannot be read. The content and not
/// the modification time: in a Kubernetes Secret volume the path the config names is a symlink
/// (`password -> ..data/password`) whose own times never change when `..data` is swapped to a new directory.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot(Vec<(PathBuf, Option<[u8; 32]>)>);

impl Snapshot {
    /// Reads every file now (blocking: call it off the runtime's threads).
    fn take(files: Vec<PathBuf>) -> Self {
        Self(
            files
                .into_iter()
                .map(|path| {
                    let digest = std::fs::read(&path).ok().map(|bytes| Sha256::digest(bytes).into());
                    (path, digest)
                })
                .collect(),
        )
    }

    fn files(&self) -> Vec<PathBuf> {
        self.0.iter().map(|(path, _)| path.clone()).collect()
    }

    /// The files whose content differs from `earlier`.
    fn changed_since(&self, earlier: &Snapshot) -> Vec<&PathBuf> {
        self.0
            .iter()
            .filter(|entry| !earlier.0.contains(entry))
            .map(|(path, _)| path)
            .collect()
    }
}

/// Runs `f` on the blocking pool: file reads must not stall a current-thread runtime serving callers.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// Waits for the next SIGHUP; forever when none can be received.
async fn hangup(signals: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(signals) = signals {
        if signals.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

/// Loads the configuration again with `load` (the config file and the environment, as at start) on each SIGHUP
/// and whenever one of the secret files changes on disk (checked every `every`), and sends it to
/// [`apply_all`]. `files` are the secret files of the running configuration; after each reload the new
/// configuration's are watched. A configuration that does not load (an empty or unreadable secret file, a
/// broken config file) is logged and dropped, and the running one stays; a broken file is not retried until it
/// changes again. Ends when the proxy stops listening on `tx`.
pub async fn reload_on_change<L>(load: L, files: Vec<PathBuf>, every: Duration, tx: mpsc::Sender<Config>)
where
    L: Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let load = Arc::new(load);
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(signals) => Some(signals),
        Err(e) => {
            warn!("cannot listen for SIGHUP ({e}); secret files are still re-read when they change");
            None
        }
    };
    let Some(mut seen) = off_runtime(move || Snapshot::take(files)).await else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let signalled = tokio::select! {
            () = hangup(&mut hangups) => true,
            _ = tick.tick() => false,
            () = tx.closed() => return,
        };
        let files = seen.files();
        let Some(now) = off_runtime(move || Snapshot::take(files)).await else {
            continue;
        };
        if signalled {
            info!("SIGHUP: re-reading the configuration");
        } else {
            let changed = now.changed_since(&seen);
            if changed.is_empty() {
                continue;
            }
            for file in changed {
                info!(file = %file.display(), "secret file changed on disk; re-reading the configuration");
            }
        }
        // What was just read is what the reload below reads: a file that changes again meanwhile differs from
        // this snapshot at the next tick and is loaded then.
        seen = now;
        let load = load.clone();
        match off_runtime(move || load()).await {
            Some(Ok(config)) => {
                let files = secret_files(&config);
                if files != seen.files() {
                    let known = seen.clone();
                    seen = off_runtime(move || {
                        let mut fresh = Snapshot::take(files);
                        for entry in &mut fresh.0 {
                            if let Some(old) = known.0.iter().find(|(path, _)| *path == entry.0) {
                                entry.1 = old.1;
                            }
                        }
                        fresh
                    })
                    .await
                    .unwrap_or(seen);
                }
                if tx.send(config).await.is_err() {
                    return;
                }
            }
            Some(Err(e)) => error!("reload rejected, the running configuration stays: {e}"),
            None => error!("reload rejected, the running configuration stays: loading it failed"),
        }
    }
}

/// A cell for the caller-facing TLS identity, when `server.tls_*` is set.
pub(crate) fn tls_cell(config: &Config) -> Result<TlsCell, ConfigError> {
    match &config.server.tls {
        Some(files) => Ok(Some(Arc::new(ArcSwap::from_pointee(acceptor(files)?)))),
        None => Ok(None),
    }
}

/// The TLS acceptor for the identity in `files`.
fn acceptor(files: &ServerTls) -> Result<TlsAcceptor, ConfigError> {
    let config = crate::tls::server_config(&files.cert_file, &files.key_file)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn only_the_secret_files_of_the_mode_in_use_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x\n").unwrap();
            path
        };
        let (password, token, keys) = (file("password"), file("token"), file("keys"));
        let text = |mode: &str| {
            format!(
                "[auth]\nmode = \"{mode}\"\norganization_id = 1\nusername = \"u\"\npassword_file = \"{}\"\n\
                 api_token_file = \"{}\"\n[access]\nclient_keys_file = \"{}\"\n",
                password.display(),
                token.display(),
                keys.display()
            )
        };
        let jwt = Config::from_toml(&text("jwt"), &|_| None).unwrap();
        assert_eq!(secret_files(&jwt), [password.clone(), keys.clone()]);
        let fixed = Config::from_toml(&text("static"), &|_| None).unwrap();
        assert_eq!(secret_files(&fixed), [token.clone(), keys.clone()]);
        assert!(needs_restart(&jwt, &fixed).contains(&"auth.mode"));
        assert!(needs_restart(&jwt, &jwt).is_empty());
        // The Redis password file is watched; the sealing key file is not (start and SIGHUP only).
        let (redis_password, seal_key) = (file("redis-password"), dir.path().join("seal-key"));
        std::fs::write(&seal_key, format!("{}\n", "ab".repeat(32))).unwrap();
        let shared = format!(
            "{}[shared]\nredis_url = \"redis://127.0.0.1:6379\"\nredis_password_file = \"{}\"\nkey_file = \"{}\"\n",
            text("jwt"),
            redis_password.display(),
            seal_key.display()
        );
        let shared = Config::from_toml(&shared, &|_| None).unwrap();
        assert_eq!(secret_files(&shared), [password, keys, redis_password]);
    }

    #[test]
    fn a_swapped_data_symlink_is_a_change_though_the_named_path_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let at = |p: &str| dir.path().join(p);
        std::fs::create_dir(at("..v1")).unwrap();
        std::fs::write(at("..v1/password"), "one").unwrap();
        symlink("..v1", at("..data")).unwrap();
        symlink("..data/password", at("password")).unwrap();
        let files = vec![at("password"), at("missing")];
        let before = Snapshot::take(files.clone());
        let link_mtime = std::fs::symlink_metadata(at("password")).unwrap().modified().unwrap();
        assert!(Snapshot::take(files.clone()).changed_since(&before).is_empty());

        std::fs::create_dir(at("..v2")).unwrap();
        std::fs::write(at("..v2/password"), "two").unwrap();
        symlink("..v2", at("..data_tmp")).unwrap();
        std::fs::rename(at("..data_tmp"), at("..data")).unwrap();
        std::fs::remove_dir_all(at("..v1")).unwrap();

        let after = Snapshot::take(files);
        assert_eq!(after.changed_since(&before), vec![&at("password")]);
        assert_eq!(
            std::fs::symlink_metadata(at("password")).unwrap().modified().unwrap(),
            link_mtime,
            "the path the config names did not change; only what it resolves to"
        );
    }
}
