//! Issue 4: the Kubernetes manifests agree with the contract and with the proxy's own config: ports, probe
//! paths, the grace period, hardening, and a ConfigMap config that `--check-config` accepts and that uses only
//! keys documented in `proxy.toml.example`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_norway::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Every YAML document under deploy/kubernetes, by kind.
fn manifests() -> BTreeMap<String, Value> {
    let mut by_kind = BTreeMap::new();
    for entry in std::fs::read_dir(DIR).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value: Value = serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
                let kind = value["kind"].as_str().unwrap().to_owned();
                assert!(by_kind.insert(kind.clone(), value).is_none(), "two {kind}s");
            }
        }
    }
    by_kind
}

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn config_toml(m: &BTreeMap<String, Value>) -> (String, toml::Value) {
    let text = m["ConfigMap"]["data"]["proxy.toml"].as_str().unwrap().to_owned();
    let value = text.parse::<toml::Table>().map(toml::Value::Table).unwrap();
    (text, value)
}

#[test]
fn deployment_ports_probes_and_grace_agree_with_the_config() {
    let m = manifests();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(m.contains_key(kind), "no {kind} under deploy/kubernetes");
    }
    let (_, cfg) = config_toml(&m);
    let proxy_port = port_of(cfg["server"]["listen"].as_str().unwrap());
    let admin_port = port_of(cfg["admin"]["listen"].as_str().unwrap());
    assert!(
        cfg["server"]["listen"].as_str().unwrap().starts_with("0.0.0.0:"),
        "must listen beyond loopback in a pod"
    );

    let d = &m["Deployment"];
    assert_eq!(d["spec"]["replicas"].as_u64(), Some(2));
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let ports: BTreeMap<&str, u64> = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports["http"], proxy_port);
    assert_eq!(ports["admin"], admin_port);
    assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_str(),
            Some("admin"),
            "{probe} must hit the admin listener"
        );
    }

    let grace = humantime::parse_duration(cfg["server"]["shutdown_grace"].as_str().unwrap())
        .unwrap()
        .as_secs();
    let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop pause");
    let termination = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        termination > grace + pause,
        "terminationGracePeriodSeconds {termination} <= {grace} + {pause}"
    );

    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(c["resources"]["requests"]["cpu"].is_string() && c["resources"]["requests"]["memory"].is_string());

    // The args name the ConfigMap's file where the volume mounts it; the secret files where the Secret lands.
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = Path::new(args[1]);
    let mounts: BTreeMap<&str, &str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["mountPath"].as_str().unwrap()))
        .collect();
    assert_eq!(args[0], "--config");
    assert_eq!(config_path.parent().unwrap(), Path::new(mounts["config"]));
    assert!(m["ConfigMap"]["data"][config_path.file_name().unwrap().to_str().unwrap()].is_string());
    let secret_data = &m["Secret"]["stringData"];
    let password_file = Path::new(cfg["auth"]["password_file"].as_str().unwrap());
    assert_eq!(password_file.parent().unwrap(), Path::new(mounts["credentials"]));
    let name = password_file.file_name().unwrap().to_str().unwrap();
    assert!(secret_data[name].is_string(), "the Secret lacks {name}");
    let keys_file = Path::new(cfg["access"]["client_keys_file"].as_str().unwrap());
    assert!(secret_data[keys_file.file_name().unwrap().to_str().unwrap()].is_string());
}

#[test]
fn service_network_policy_and_budget_select_the_pods_and_the_right_port() {
    let m = manifests();
    let (_, cfg) = config_toml(&m);
    let proxy_port = port_of(cfg["server"]["listen"].as_str().unwrap());
    let labels = &m["Deployment"]["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&m["Service"]["spec"]["selector"], labels);
    assert_eq!(m["Service"]["spec"]["ports"][0]["targetPort"].as_str(), Some("http"));
    assert_eq!(&m["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&m["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"], labels);
    let ingress = &m["NetworkPolicy"]["spec"]["ingress"][0];
    assert_eq!(ingress["ports"][0]["port"].as_u64(), Some(proxy_port));
    assert_eq!(
        ingress["from"][0]["podSelector"]["matchLabels"]["zapsign-proxy-client"].as_str(),
        Some("true"),
        "only labelled client pods may call the proxy"
    );
}

#[test]
fn configmap_config_passes_check_config_and_uses_documented_keys() {
    let m = manifests();
    let (text, cfg) = config_toml(&m);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    // The secret files exist only in a pod; the environment stands in for them here.
    let out = Command::new(env!("CARGO_BIN_EXE_zapsign-proxy"))
        .args(["--check-config", "--config"])
        .arg(&path)
        .env_clear()
        .env("ZAPSIGN_PASSWORD", "placeholder")
        .env("ZAPSIGN_PROXY_CLIENT_KEYS", "placeholder-key")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml.example")).unwrap();
    for (section, table) in cfg.as_table().unwrap() {
        assert!(
            example.contains(&format!("[{section}]")),
            "section [{section}] not in proxy.toml.example"
        );
        for key in table.as_table().unwrap().keys() {
            let documented = example.lines().any(|l| {
                let l = l.trim_start_matches('#').trim();
                l.starts_with(&format!("{key} =")) || l.starts_with(&format!("{key}="))
            });
            assert!(documented, "{section}.{key} is not documented in proxy.toml.example");
        }
    }
}
