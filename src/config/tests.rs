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
