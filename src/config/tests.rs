//! The config rules, one test each; `tests/process.rs` checks the same through the binary.

use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

const STATIC: &str = "[auth]\nmode = \"static\"\napi_token = \"t0k3n\"\n";
const JWT: &str = "[auth]\norganization_id = 7\nusername = \"u\"\npassword = \"p\"\n";

fn jwt(c: &Config) -> &JwtAuth {
    match &c.auth.mode {
        Auth::Jwt(jwt) => jwt,
        other => panic!("not JWT mode: {other:?}"),
    }
}

fn static_token(c: &Config) -> &StaticAuth {
    match &c.auth.mode {
        Auth::Static(s) => s,
        other => panic!("not static mode: {other:?}"),
    }
}

#[test]
fn defaults_match_the_contract() {
    let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_connections, 10_000);
    assert_eq!(c.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.admin.listen.unwrap().to_string(), "127.0.0.1:9090");
    assert_eq!(c.upstream.url.text, "https://api.zapsign.com.br");
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(120));
    assert_eq!(c.upstream.idle_timeout, Duration::from_secs(50));
    assert_eq!(c.upstream.max_idle_connections, 32);
    assert_eq!(c.auth.replay_buffer, 16 << 20);
    assert_eq!(c.auth.timeout, Duration::from_secs(10));
    assert_eq!(c.access.allow_paths, vec!["/api/".to_owned()]);
    assert_eq!(c.access.allow_networks.len(), 2);
    assert_eq!(c.log.format, LogFormat::Text);
    let c = Config::from_toml(JWT, &env_of(&[])).unwrap();
    assert_eq!(jwt(&c).url.text, "https://api.zapsign.com.br");
    assert_eq!(jwt(&c).refresh_margin, Duration::from_secs(300));
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let err = Config::from_toml("[server]\nlisten_addr = \"x\"\n", &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("listen_addr"), "{err}");
}

#[test]
fn env_overrides_file() {
    let env = env_of(&[
        ("ZAPSIGN_PROXY_LISTEN", "127.0.0.1:7000"),
        ("ZAPSIGN_API_TOKEN", "from-env"),
    ]);
    let c = Config::from_toml(STATIC, &env).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:7000");
    assert_eq!(static_token(&c).api_token.expose(), "from-env");
}

#[test]
fn bad_scheme_names_the_key() {
    let err = Config::from_toml(&format!("{STATIC}[upstream]\nurl = \"ftp://x\"\n"), &env_of(&[])).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("upstream.url") && msg.contains("https://"), "{msg}");
}

#[test]
fn url_with_path_is_refused() {
    assert!(BaseUrl::parse("upstream.url", "https://x.example/api").is_err());
    assert!(BaseUrl::parse("upstream.url", "https://u@x.example").is_err());
    assert_eq!(
        BaseUrl::parse("upstream.url", "https://x.example/").unwrap().text,
        "https://x.example"
    );
    assert_eq!(
        BaseUrl::parse("upstream.url", "http://x.example:81").unwrap().port(),
        81
    );
}

#[test]
fn bad_listen_address_names_the_key() {
    let err = Config::from_toml(&format!("{STATIC}[server]\nlisten = \"localhost\"\n"), &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("server.listen"), "{err}");
}

#[test]
fn missing_file_names_the_key() {
    let err = Config::from_toml(
        "[auth]\nmode = \"static\"\napi_token_file = \"/nonexistent/token\"\n",
        &env_of(&[]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("auth.api_token_file"), "{err}");
}

#[test]
fn jwt_mode_requires_credentials() {
    let err = Config::from_toml("", &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("auth.organization_id"), "{err}");
    let env = env_of(&[("ZAPSIGN_ORGANIZATION_ID", "42"), ("ZAPSIGN_USERNAME", "u")]);
    let err = Config::from_toml("", &env).unwrap_err();
    assert!(err.to_string().contains("auth.password"), "{err}");
    let env = env_of(&[
        ("ZAPSIGN_ORGANIZATION_ID", "42"),
        ("ZAPSIGN_USERNAME", "u"),
        ("ZAPSIGN_PASSWORD", "p"),
    ]);
    assert!(Config::from_toml("", &env).is_ok());
}

#[test]
fn organization_id_accepts_integer_and_digit_string_only() {
    let base = "[auth]\nusername = \"u\"\npassword = \"p\"\n";
    let c = Config::from_toml(&format!("{base}organization_id = 123\n"), &env_of(&[])).unwrap();
    assert_eq!(jwt(&c).organization_id, "123");
    let c = Config::from_toml(&format!("{base}organization_id = \"0456\"\n"), &env_of(&[])).unwrap();
    assert_eq!(jwt(&c).organization_id, "0456");
    assert!(Config::from_toml(&format!("{base}organization_id = \"12a\"\n"), &env_of(&[])).is_err());
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_size("k", "16MiB").unwrap(), 16 << 20);
    assert_eq!(parse_size("k", "512KiB").unwrap(), 512 << 10);
    assert_eq!(parse_size("k", "10MB").unwrap(), 10_000_000);
    assert_eq!(parse_size("k", "100").unwrap(), 100);
    assert!(parse_size("k", "16 parsecs").is_err());
    assert!(parse_size("k", "").is_err());
    assert!(parse_size("k", "99999999999999999999GiB").is_err());
    let c = Config::from_toml(
        &format!("{STATIC}[server]\nheader_read_timeout = \"500ms\"\n"),
        &env_of(&[]),
    )
    .unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_millis(500));
    let err = Config::from_toml(&format!("{STATIC}[server]\nshutdown_grace = \"soon\"\n"), &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("server.shutdown_grace"), "{err}");
}

#[test]
fn upstream_pool_keys_parse_render_and_name_themselves() {
    let text = format!("{STATIC}[upstream]\nidle_timeout = \"1500ms\"\nmax_idle_connections = 0\n");
    let c = Config::from_toml(&text, &env_of(&[])).unwrap();
    assert_eq!(c.upstream.idle_timeout, Duration::from_millis(1500));
    assert_eq!(c.upstream.max_idle_connections, 0);
    let token = [("ZAPSIGN_API_TOKEN", "t0k3n")];
    let again = Config::from_toml(&c.to_redacted_toml(), &env_of(&token)).unwrap();
    assert_eq!(again.upstream.idle_timeout, Duration::from_millis(1500));
    assert_eq!(again.upstream.max_idle_connections, 0);
    for bad in [
        "idle_timeout = \"0s\"",
        "idle_timeout = \"later\"",
        "max_idle_connections = -1",
    ] {
        let err = Config::from_toml(&format!("{STATIC}[upstream]\n{bad}\n"), &env_of(&[]))
            .unwrap_err()
            .to_string();
        let key = bad.split(' ').next().unwrap();
        assert!(err.contains(key), "{bad}: {err}");
    }
}

#[test]
fn redacted_output_hides_secrets() {
    let env = env_of(&[("ZAPSIGN_PROXY_CLIENT_KEYS", "ck-1,ck-2")]);
    let c = Config::from_toml(STATIC, &env).unwrap();
    let out = c.to_redacted_toml();
    assert!(!out.contains("t0k3n") && !out.contains("ck-1"), "{out}");
    assert!(out.contains("# auth.api_token: set, not shown\n"), "{out}");
    assert!(out.contains("# access.client_keys: set, not shown\n"), "{out}");
    assert!(!out.contains("[redacted]") && !out.contains("client_keys ="), "{out}");
    assert_eq!(c.access.client_keys.len(), 2);
}

#[test]
fn an_empty_client_keys_variable_does_not_turn_off_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "k-1\n").unwrap();
    let text = format!("{STATIC}[access]\nclient_keys_file = \"{}\"\n", keys.display());
    let c = Config::from_toml(&text, &env_of(&[("ZAPSIGN_PROXY_CLIENT_KEYS", " , ")])).unwrap();
    assert_eq!(c.access.client_keys.len(), 1);
}

#[test]
fn sizes_render_as_sizes_that_parse_back() {
    for n in [0, 1, 1000, 1 << 10, 3 << 20, (16 << 20) + 1, 5 << 30, u64::MAX] {
        assert_eq!(parse_size("k", &format_size(n)).unwrap(), n, "{}", format_size(n));
    }
    assert_eq!(format_size(16 << 20), "16MiB");
}

#[test]
fn log_level_takes_levels_and_target_directives_only() {
    for good in [
        "info",
        "TRACE",
        "off",
        "warn,zapsign_proxy=debug",
        "info,zapsign_proxy=debug",
        "zapsign_proxy::auth=trace",
        "info, hyper=warn ,",
    ] {
        let normal = parse_log_filter(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        assert_eq!(parse_log_filter(&normal), Ok(normal.clone()));
    }
    for bad in [
        "verbose",
        "",
        " , ",
        "info,verbose",
        "zapsign_proxy=loud",
        "=debug",
        "3",
        "info,[{=x",
    ] {
        assert!(parse_log_filter(bad).is_err(), "{bad:?} passed");
    }
    let err = Config::from_toml(&format!("{STATIC}[log]\nlevel = \"verbose\"\n"), &env_of(&[])).unwrap_err();
    assert!(
        err.to_string().contains("log.level") && err.to_string().contains("verbose"),
        "{err}"
    );
}

#[test]
fn rust_log_overrides_log_level_and_a_bad_one_is_ignored() {
    let text = format!("{STATIC}[log]\nlevel = \"warn\"\n");
    let c = Config::from_toml(&text, &env_of(&[("RUST_LOG", "debug,hyper=info")])).unwrap();
    assert_eq!(c.log.level, "debug,hyper=info");
    assert!(c.log.level_from_rust_log && c.log.rust_log_refused.is_none());
    assert!(c.to_redacted_toml().contains("level = \"debug,hyper=info\""));
    let c = Config::from_toml(&text, &env_of(&[("RUST_LOG", "verbose")])).unwrap();
    assert_eq!(c.log.level, "warn");
    let why = c.log.rust_log_refused.unwrap();
    assert!(why.contains("RUST_LOG") && why.contains("verbose"), "{why}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = "[server]\nshutdown_grace = \"soon\"\nmax_connections = 0\n[log]\nlevel = \"verbose\"\n";
    let err = Config::from_toml(text, &env_of(&[])).unwrap_err();
    let keys: Vec<String> = err
        .problems()
        .iter()
        .map(|p| match p {
            ConfigError::Invalid { key, .. } => key.clone(),
            other => panic!("{other}"),
        })
        .collect();
    assert_eq!(
        keys,
        [
            "server.max_connections",
            "server.shutdown_grace",
            "auth.organization_id",
            "auth.username",
            "auth.password",
            "log.level"
        ],
        "{err}"
    );
    // One a line, each naming its key.
    let shown = err.to_string();
    assert_eq!(shown.lines().count(), 7, "{shown}");
    assert!(shown.lines().skip(1).all(|l| l.starts_with("  - `")), "{shown}");
    // A value present but wrong is not also reported missing.
    let err = Config::from_toml(
        "[auth]\norganization_id = \"x1\"\nusername = \"u\"\npassword = \"\"\n",
        &env_of(&[]),
    )
    .unwrap_err();
    assert_eq!(err.problems().len(), 2, "{err}");
    assert!(!err.to_string().contains("missing"), "{err}");
}

#[test]
fn wrong_keys_in_several_sections_are_all_named() {
    let err = Config::from_toml("[server]\nlisten_addr = 1\n[log]\nlevl = \"x\"\n[nope]\n", &env_of(&[])).unwrap_err();
    let shown = err.to_string();
    for name in ["listen_addr", "levl", "[nope]"] {
        assert!(shown.contains(name), "{name} not named: {shown}");
    }
    // One alone keeps the parser's message, which points at the line.
    let err = Config::from_toml("[server]\nlisten_addr = 1\n", &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn empty_admin_listen_disables_it() {
    let c = Config::from_toml(&format!("{STATIC}[admin]\nlisten = \"\"\n"), &env_of(&[])).unwrap();
    assert!(c.admin.listen.is_none());
}

#[test]
fn inline_and_file_secret_together_is_an_error() {
    let err = Config::from_toml(
        "[auth]\nmode = \"static\"\napi_token = \"a\"\napi_token_file = \"/etc/hostname\"\n",
        &env_of(&[]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("auth.api_token"), "{err}");
}

#[test]
fn each_mode_keeps_only_its_own_secret() {
    // Both modes' secrets in the environment: each mode keeps, and `--check-config` names, only its own.
    let env = env_of(&[
        ("ZAPSIGN_ORGANIZATION_ID", "42"),
        ("ZAPSIGN_USERNAME", "u"),
        ("ZAPSIGN_PASSWORD", "p"),
        ("ZAPSIGN_API_TOKEN", "t"),
    ]);
    let c = Config::from_toml("", &env).unwrap();
    assert_eq!(jwt(&c).password.expose(), "p");
    let out = c.to_redacted_toml();
    assert!(
        out.contains("# auth.password: set, not shown") && !out.contains("api_token"),
        "{out}"
    );
    let c = Config::from_toml("[auth]\nmode = \"static\"\n", &env).unwrap();
    assert_eq!(static_token(&c).api_token.expose(), "t");
    let out = c.to_redacted_toml();
    assert!(out.contains("# auth.api_token: set, not shown"), "{out}");
    let rendered: toml::Table = toml::from_str(&out).unwrap();
    let auth: Vec<&String> = rendered["auth"].as_table().unwrap().keys().collect();
    assert_eq!(auth, ["mode", "replay_buffer", "timeout"], "{out}");
    assert!(!out.contains("password"), "{out}");
}

#[test]
fn the_other_modes_keys_are_still_checked() {
    // Static mode needs no organization id, but one that is given and wrong is still an error.
    let err = Config::from_toml(&format!("{STATIC}organization_id = \"12a\"\n"), &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("auth.organization_id"), "{err}");
    let err = Config::from_toml(&format!("{JWT}api_token_file = \"/nonexistent/token\"\n"), &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("auth.api_token_file"), "{err}");
}

#[test]
fn tls_is_both_files_or_none() {
    let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
    assert_eq!(c.server.tls, None);
    let both = format!("{STATIC}[server]\ntls_cert_file = \"/etc/hostname\"\ntls_key_file = \"/etc/hostname\"\n");
    let c = Config::from_toml(&both, &env_of(&[])).unwrap();
    let tls = c.server.tls.unwrap();
    assert_eq!(
        (tls.cert_file.to_str(), tls.key_file.to_str()),
        (Some("/etc/hostname"), Some("/etc/hostname"))
    );
    let one = format!("{STATIC}[server]\ntls_key_file = \"/etc/hostname\"\n");
    let err = Config::from_toml(&one, &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("server.tls_cert_file"), "{err}");
}

#[test]
fn a_value_from_the_environment_is_named_with_its_variable() {
    let env = env_of(&[("ZAPSIGN_PROXY_WORKERS", "0"), ("ZAPSIGN_ORGANIZATION_ID", "x")]);
    let err = Config::from_toml(&format!("{JWT}[server]\nworkers = 2\n"), &env).unwrap_err();
    let shown = err.to_string();
    assert!(
        shown.contains("`server.workers (from ZAPSIGN_PROXY_WORKERS)`")
            && shown.contains("`auth.organization_id (from ZAPSIGN_ORGANIZATION_ID)`"),
        "{shown}"
    );
    // From the file, the key alone.
    let err = Config::from_toml(&format!("{STATIC}[server]\nworkers = 0\n"), &env_of(&[])).unwrap_err();
    assert!(err.to_string().contains("`server.workers`:"), "{err}");
}

#[test]
fn an_environment_secret_wins_over_the_file_key_but_not_over_a_conflict() {
    // The file key is not read when the environment gives the secret (it may not even exist).
    let text = "[auth]\nmode = \"static\"\napi_token_file = \"/nonexistent/token\"\n";
    let c = Config::from_toml(text, &env_of(&[("ZAPSIGN_API_TOKEN", "env")])).unwrap();
    assert_eq!(static_token(&c).api_token.expose(), "env");
    // An empty variable counts as unset: the file key is read, and here it is missing.
    assert!(Config::from_toml(text, &env_of(&[("ZAPSIGN_API_TOKEN", "")])).is_err());
    // A file giving the secret inline and by file is wrong whatever the environment says.
    let both = "[auth]\nmode = \"static\"\napi_token = \"a\"\napi_token_file = \"/etc/hostname\"\n";
    let err = Config::from_toml(both, &env_of(&[("ZAPSIGN_API_TOKEN", "env")])).unwrap_err();
    assert!(
        err.to_string().contains("both auth.api_token and auth.api_token_file"),
        "{err}"
    );
}

#[test]
fn pacing_defaults_to_the_accounts_budget_and_zero_turns_it_off() {
    let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
    assert_eq!(
        c.pacing,
        Some(crate::pacing::Settings {
            limit: 500,
            period: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            queue_limit: 1000,
        })
    );
    let text = format!("{STATIC}[pacing]\nlimit = 20\nperiod = \"1s\"\nmax_wait = \"2s\"\nqueue_limit = 5\n");
    let c = Config::from_toml(&text, &env_of(&[])).unwrap();
    let s = c.pacing.unwrap();
    assert_eq!(
        (s.limit, s.period, s.max_wait, s.queue_limit),
        (20, Duration::from_secs(1), Duration::from_secs(2), 5)
    );
    // The token is not rendered (a secret): the round trip brings it by the environment.
    let token = [("ZAPSIGN_API_TOKEN", "t0k3n")];
    let again = Config::from_toml(&c.to_redacted_toml(), &env_of(&token)).unwrap();
    assert_eq!(again.pacing, c.pacing);
    // The environment wins over the file; 0 builds no pacer and renders as `limit = 0` alone.
    let off = Config::from_toml(&text, &env_of(&[("ZAPSIGN_PROXY_PACING_LIMIT", "0")])).unwrap();
    assert_eq!(off.pacing, None);
    assert!(off.to_redacted_toml().contains("[pacing]\nlimit = 0\n"));
    assert_eq!(
        Config::from_toml(&off.to_redacted_toml(), &env_of(&token))
            .unwrap()
            .pacing,
        None
    );
}

#[test]
fn a_bad_pacing_value_names_its_key() {
    let text = format!("{STATIC}[pacing]\nlimit = -1\n");
    let err = Config::from_toml(&text, &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("limit = -1"), "{err}");
    let err = Config::from_toml(STATIC, &env_of(&[("ZAPSIGN_PROXY_PACING_LIMIT", "lots")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pacing.limit (from ZAPSIGN_PROXY_PACING_LIMIT)"), "{err}");
    let err = Config::from_toml(&format!("{STATIC}[pacing]\nperiod = \"0s\"\n"), &env_of(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("pacing.period"), "{err}");
}

// ---- shared.* ----

/// A sealing key (64 hex digits) that must never appear in any output.
const SEAL_HEX: &str = "5eed5eed0123456789abcdef0123456789abcdef0123456789abcdef5eed5eed";
const REDIS: &str = "redis://127.0.0.1:6379/0";

/// A directory holding a sealing key file, a Redis password file and a CA file.
struct SharedFiles {
    dir: tempfile::TempDir,
}

impl SharedFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), format!("{SEAL_HEX}\n")).unwrap();
        std::fs::write(dir.path().join("redis-password"), "r3d1s-pw\n").unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["redis.example".to_owned()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert.pem()).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `STATIC` with a `[shared]` section holding `url`, the key file and `extra` lines.
    fn config(&self, url: &str, extra: &str) -> String {
        format!(
            "{STATIC}[shared]\nredis_url = \"{url}\"\nkey_file = \"{}\"\n{extra}",
            self.path("key")
        )
    }
}

fn shared(c: &Config) -> &SharedConfig {
    c.shared.as_ref().expect("shared settings")
}

/// The error's text, asserting it names `key`.
fn error_naming(text: &str, env: &[(&str, &str)], key: &str) -> String {
    let err = Config::from_toml(text, &env_of(env)).unwrap_err().to_string();
    assert!(err.contains(&format!("`{key}")), "{key} not named: {err}");
    err
}

#[test]
fn shared_is_off_without_a_redis_url() {
    let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
    assert!(c.shared.is_none());
    assert!(!c.to_redacted_toml().contains("[shared]"));
    // A blank URL (a template's empty placeholder, in the file or the environment) means alone too.
    let c = Config::from_toml(&format!("{STATIC}[shared]\nredis_url = \" \"\n"), &env_of(&[])).unwrap();
    assert!(c.shared.is_none());
    let c = Config::from_toml(STATIC, &env_of(&[("ZAPSIGN_PROXY_REDIS_URL", "")])).unwrap();
    assert!(c.shared.is_none());
}

#[test]
fn shared_settings_from_the_file_with_defaults() {
    let files = SharedFiles::new();
    let text = files.config(
        REDIS,
        &format!("redis_password_file = \"{}\"\n", files.path("redis-password")),
    );
    let c = Config::from_toml(&text, &env_of(&[])).unwrap();
    let s = shared(&c);
    assert_eq!(s.redis_url.as_str(), REDIS);
    assert!(!s.redis_url.is_tls());
    assert_eq!(s.password.as_ref().unwrap().expose(), "r3d1s-pw");
    assert_eq!(
        s.password_file.as_ref().unwrap().display().to_string(),
        files.path("redis-password")
    );
    assert_eq!(s.key_file.as_ref().unwrap().display().to_string(), files.path("key"));
    assert_eq!((s.key_prefix.as_str(), s.replicas), ("zapsign-proxy", 1));
    assert_eq!((s.ca_file.as_ref(), s.ca_pem.as_ref()), (None, None));
    assert_eq!(s.scope, "static-b81c829ac55e858e");
    // The key is the file's: what it seals opens with the same hex.
    let sealed = s.key.seal("n", b"token").unwrap();
    assert_eq!(
        crate::shared::seal::SealKey::from_hex(SEAL_HEX)
            .unwrap()
            .open("n", &sealed)
            .unwrap(),
        b"token"
    );
    let text = files.config(REDIS, "key_prefix = \"prod:zapsign\"\nreplicas = 3\n");
    let s = Config::from_toml(&text, &env_of(&[])).unwrap().shared.unwrap();
    assert_eq!(
        (s.key_prefix.as_str(), s.replicas, s.password),
        ("prod:zapsign", 3, None)
    );
}

#[test]
fn shared_environment_overrides_the_file() {
    let files = SharedFiles::new();
    // The environment's password and key win, and their file keys are not read (they may not even exist).
    let text = format!(
        "{STATIC}[shared]\nredis_url = \"redis://file.example:6379\"\nredis_password_file = \"/nonexistent/pw\"\n\
         key_file = \"/nonexistent/key\"\nreplicas = 2\n"
    );
    let env = [
        ("ZAPSIGN_PROXY_REDIS_URL", "rediss://env.example:6380/2"),
        ("ZAPSIGN_PROXY_REDIS_PASSWORD", "env-pw"),
        ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX),
        ("ZAPSIGN_PROXY_REPLICAS", "5"),
    ];
    let c = Config::from_toml(&text, &env_of(&env)).unwrap();
    let s = shared(&c);
    assert_eq!(s.redis_url.as_str(), "rediss://env.example:6380/2");
    assert!(s.redis_url.is_tls());
    assert_eq!(s.password.as_ref().unwrap().expose(), "env-pw");
    assert_eq!(s.replicas, 5);
    // The environment alone is enough.
    let env = [
        ("ZAPSIGN_PROXY_REDIS_URL", REDIS),
        ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX),
    ];
    let s = Config::from_toml(STATIC, &env_of(&env)).unwrap().shared.unwrap();
    assert_eq!((s.redis_url.as_str(), s.key_file, s.password), (REDIS, None, None));
    // Blank secrets count as unset: the files are read.
    let text = files.config(
        REDIS,
        &format!("redis_password_file = \"{}\"\n", files.path("redis-password")),
    );
    let env = [("ZAPSIGN_PROXY_REDIS_PASSWORD", ""), ("ZAPSIGN_PROXY_SHARED_KEY", "")];
    let s = Config::from_toml(&text, &env_of(&env)).unwrap().shared.unwrap();
    assert_eq!(s.password.unwrap().expose(), "r3d1s-pw");
    // A bad value from the environment is named with its variable.
    error_naming(
        &text,
        &[("ZAPSIGN_PROXY_REPLICAS", "0")],
        "shared.replicas (from ZAPSIGN_PROXY_REPLICAS)",
    );
    error_naming(
        STATIC,
        &[
            ("ZAPSIGN_PROXY_REDIS_URL", "http://x"),
            ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX),
        ],
        "shared.redis_url (from ZAPSIGN_PROXY_REDIS_URL)",
    );
}

#[test]
fn a_redis_url_needs_a_key() {
    let err = error_naming(
        &format!("{STATIC}[shared]\nredis_url = \"{REDIS}\"\n"),
        &[],
        "shared.key_file",
    );
    assert!(
        err.contains("openssl rand -hex 32") && err.contains("ZAPSIGN_PROXY_SHARED_KEY"),
        "{err}"
    );
}

#[test]
fn a_malformed_key_is_refused_without_being_shown() {
    let files = SharedFiles::new();
    let short = &SEAL_HEX[..63];
    let not_hex = format!("{}zz", &SEAL_HEX[..62]);
    for bad in [short, not_hex.as_str()] {
        std::fs::write(files.dir.path().join("key"), bad).unwrap();
        let err = error_naming(&files.config(REDIS, ""), &[], "shared.key_file");
        assert!(err.contains("64 hex characters") && !err.contains(bad), "{err}");
        let env = [("ZAPSIGN_PROXY_REDIS_URL", REDIS), ("ZAPSIGN_PROXY_SHARED_KEY", bad)];
        let err = error_naming(STATIC, &env, "shared.key (from ZAPSIGN_PROXY_SHARED_KEY)");
        assert!(!err.contains(bad), "{err}");
    }
    // An empty or unreadable key file names its key.
    std::fs::write(files.dir.path().join("key"), "\n").unwrap();
    error_naming(&files.config(REDIS, ""), &[], "shared.key_file");
    let text = format!("{STATIC}[shared]\nredis_url = \"{REDIS}\"\nkey_file = \"/nonexistent/key\"\n");
    error_naming(&text, &[], "shared.key_file");
}

#[test]
fn a_redis_url_must_be_redis_or_rediss_and_parse() {
    let files = SharedFiles::new();
    for bad in [
        "http://127.0.0.1:6379",
        "unix:///run/redis.sock",
        "valkey://x:6379",
        "127.0.0.1:6379",
    ] {
        let err = error_naming(&files.config(bad, ""), &[], "shared.redis_url");
        assert!(err.contains("redis://HOST:PORT/DB"), "{err}");
    }
    for bad in [
        "redis://",
        "redis://x:port",
        "redis://x:6379/db",
        "redis://0.0.0.0:6379",
    ] {
        error_naming(&files.config(bad, ""), &[], "shared.redis_url");
    }
    // `#insecure` would turn off the certificate check.
    let err = error_naming(&files.config("rediss://x:6380#insecure", ""), &[], "shared.redis_url");
    assert!(err.contains("shared.ca_file"), "{err}");
    // A user name (Redis ACL) is fine; the password comes from the password file.
    for good in [
        "redis://x",
        "redis://proxy@x:6379/1",
        "rediss://[::1]:6380",
        "redis://x/?protocol=resp3",
    ] {
        let c = Config::from_toml(&files.config(good, ""), &env_of(&[])).unwrap();
        assert_eq!(shared(&c).redis_url.as_str(), good);
    }
}

#[test]
fn a_password_in_the_redis_url_is_refused_and_never_repeated() {
    let files = SharedFiles::new();
    for url in [
        "redis://:hunter2@x:6379",
        "redis://user:hunter2@x:6379/0",
        "rediss://:hunter2@x",
    ] {
        let err = error_naming(&files.config(url, ""), &[], "shared.redis_url");
        assert!(
            err.contains("shared.redis_password_file") && !err.contains("hunter2"),
            "{err}"
        );
        let env = [("ZAPSIGN_PROXY_REDIS_URL", url), ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX)];
        let err = error_naming(STATIC, &env, "shared.redis_url (from ZAPSIGN_PROXY_REDIS_URL)");
        assert!(!err.contains("hunter2"), "{err}");
    }
    // Nor is a URL with user info repeated when it fails to parse for another reason.
    let err = error_naming(&files.config("redis://:hunter2@x:port", ""), &[], "shared.redis_url");
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn replicas_are_one_or_more() {
    let files = SharedFiles::new();
    error_naming(&files.config(REDIS, "replicas = 0\n"), &[], "shared.replicas");
    assert!(Config::from_toml(&files.config(REDIS, "replicas = -1\n"), &env_of(&[])).is_err());
    error_naming(
        &files.config(REDIS, ""),
        &[("ZAPSIGN_PROXY_REPLICAS", "many")],
        "shared.replicas (from ZAPSIGN_PROXY_REPLICAS)",
    );
}

#[test]
fn a_ca_file_needs_rediss_and_a_certificate() {
    let files = SharedFiles::new();
    let ca = format!("ca_file = \"{}\"\n", files.path("ca.pem"));
    let c = Config::from_toml(&files.config("rediss://x:6380", &ca), &env_of(&[])).unwrap();
    let pem = shared(&c).ca_pem.clone().unwrap();
    assert_eq!(pem.as_slice(), std::fs::read(files.path("ca.pem")).unwrap());
    assert!(
        format!("{c:?}").contains("ca_pem_bytes"),
        "the content is shown by its length"
    );
    // Given with redis:// it would never be used.
    let err = error_naming(&files.config(REDIS, &ca), &[], "shared.ca_file");
    assert!(err.contains("rediss://"), "{err}");
    // Unreadable, or no certificate in it.
    let missing = files.config("rediss://x", "ca_file = \"/nonexistent/ca.pem\"\n");
    error_naming(&missing, &[], "shared.ca_file");
    std::fs::write(files.dir.path().join("ca.pem"), "not a certificate\n").unwrap();
    let err = error_naming(&files.config("rediss://x", &ca), &[], "shared.ca_file");
    assert!(err.contains("no certificate"), "{err}");
    // A PEM block that is no certificate at all.
    let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    std::fs::write(files.dir.path().join("ca.pem"), junk).unwrap();
    let err = error_naming(&files.config("rediss://x", &ca), &[], "shared.ca_file");
    assert!(err.contains("not a usable CA"), "{err}");
}

#[test]
fn a_key_prefix_is_a_plain_name() {
    let files = SharedFiles::new();
    for bad in [
        "",
        " ",
        "zap sign",
        "zap\tsign",
        "zapsign:",
        ":zapsign",
        "zap*",
        "zap?",
        "zap[1]",
    ] {
        let text = files.config(REDIS, &format!("key_prefix = {bad:?}\n"));
        error_naming(&text, &[], "shared.key_prefix");
    }
    for good in ["zapsign-proxy", "prod:zapsign", "{zapsign}", "a.b_c/d"] {
        let text = files.config(REDIS, &format!("key_prefix = {good:?}\n"));
        let c = Config::from_toml(&text, &env_of(&[])).unwrap();
        assert_eq!(shared(&c).key_prefix, good);
    }
}

#[test]
fn an_unreadable_redis_password_file_names_its_key() {
    let files = SharedFiles::new();
    let text = files.config(REDIS, "redis_password_file = \"/nonexistent/pw\"\n");
    error_naming(&text, &[], "shared.redis_password_file");
    std::fs::write(files.dir.path().join("redis-password"), "\n").unwrap();
    let text = files.config(
        REDIS,
        &format!("redis_password_file = \"{}\"\n", files.path("redis-password")),
    );
    error_naming(&text, &[], "shared.redis_password_file");
}

#[test]
fn shared_keys_without_a_redis_url_are_an_error() {
    let files = SharedFiles::new();
    let text = format!("{STATIC}[shared]\nkey_file = \"{}\"\nreplicas = 3\n", files.path("key"));
    let err = error_naming(&text, &[], "shared.redis_url");
    assert!(err.contains("shared.key_file, shared.replicas are set"), "{err}");
    let err = error_naming(STATIC, &[("ZAPSIGN_PROXY_REPLICAS", "3")], "shared.redis_url");
    assert!(
        err.contains("shared.replicas (from ZAPSIGN_PROXY_REPLICAS) is set"),
        "{err}"
    );
    // A key given inline in the file is no key of the contract: the environment or a file only.
    for inline in ["key = \"00\"", "redis_password = \"pw\""] {
        let text = files.config(REDIS, &format!("{inline}\n"));
        let err = Config::from_toml(&text, &env_of(&[])).unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}

#[test]
fn the_shared_scope_is_the_organization_or_a_hash() {
    let c = Config::from_toml(JWT, &env_of(&[])).unwrap();
    assert_eq!(c.auth.mode.shared_scope(), "7");
    let mut no_org = jwt(&c).clone();
    no_org.organization_id = String::new();
    assert_eq!(Auth::Jwt(no_org).shared_scope(), "user-0bfe935e70c321c7");
    // Static mode: 16 hex digits of the token's SHA-256 (sha256("t0k3n") starts b81c829a...), never the token.
    let c = Config::from_toml(STATIC, &env_of(&[])).unwrap();
    assert_eq!(c.auth.mode.shared_scope(), "static-b81c829ac55e858e");
    let other = Config::from_toml(STATIC, &env_of(&[("ZAPSIGN_API_TOKEN", "other")])).unwrap();
    assert_ne!(other.auth.mode.shared_scope(), c.auth.mode.shared_scope());
    // The validated settings carry the scope of their own auth.
    let env = [
        ("ZAPSIGN_PROXY_REDIS_URL", REDIS),
        ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX),
    ];
    let c = Config::from_toml(JWT, &env_of(&env)).unwrap();
    assert_eq!(shared(&c).scope, "7");
}

#[test]
fn shared_secrets_never_show_and_the_output_loads_again() {
    let files = SharedFiles::new();
    let secrets = ["r3d1s-pw", "env-pw", SEAL_HEX, "t0k3n"];
    let assert_hidden = |c: &Config| {
        let (debug, out) = (format!("{c:?}"), c.to_redacted_toml());
        for secret in secrets {
            assert!(
                !debug.contains(secret) && !out.contains(secret),
                "{secret} shown:\n{debug}\n{out}"
            );
        }
    };
    // From files: the file keys are shown.
    let text = files.config(
        "rediss://proxy@x:6380/1",
        &format!(
            "redis_password_file = \"{}\"\nca_file = \"{}\"\nkey_prefix = \"prod:zp\"\nreplicas = 3\n",
            files.path("redis-password"),
            files.path("ca.pem")
        ),
    );
    let c = Config::from_toml(&text, &env_of(&[])).unwrap();
    assert_hidden(&c);
    let out = c.to_redacted_toml();
    for line in [
        "[shared]\nredis_url = \"rediss://proxy@x:6380/1\"\n".to_owned(),
        format!("redis_password_file = \"{}\"\n", files.path("redis-password")),
        format!("key_file = \"{}\"\n", files.path("key")),
        "key_prefix = \"prod:zp\"\nreplicas = 3\n".to_owned(),
    ] {
        assert!(out.contains(&line), "{line} missing:\n{out}");
    }
    assert!(!out.contains("# shared."), "{out}");
    let token = [("ZAPSIGN_API_TOKEN", "t0k3n")];
    let again = Config::from_toml(&out, &env_of(&token)).unwrap();
    assert_eq!(again.to_redacted_toml(), out);
    assert_eq!(format!("{:?}", again.shared), format!("{:?}", c.shared));
    // From the environment: only comments say they are set.
    let env = [
        ("ZAPSIGN_PROXY_REDIS_URL", REDIS),
        ("ZAPSIGN_PROXY_REDIS_PASSWORD", "env-pw"),
        ("ZAPSIGN_PROXY_SHARED_KEY", SEAL_HEX),
    ];
    let c = Config::from_toml(STATIC, &env_of(&env)).unwrap();
    assert_hidden(&c);
    let out = c.to_redacted_toml();
    assert!(
        out.contains("# shared.redis_password: set, not shown\n") && out.contains("# shared.key: set, not shown\n"),
        "{out}"
    );
    let env: Vec<_> = env.into_iter().chain(token).collect();
    let again = Config::from_toml(&out, &env_of(&env)).unwrap();
    assert_eq!(again.to_redacted_toml(), out);
    assert_eq!(shared(&again).password.as_ref().unwrap().expose(), "env-pw");
}
