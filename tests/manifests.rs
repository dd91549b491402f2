//! Issue 4: the Kubernetes manifests agree with the contract and with the proxy's own config: ports, probe
//! paths, the grace period, hardening, and a ConfigMap config that `--check-config` accepts and that uses only
//! keys documented in `proxy.toml.example`. Issue 9: they run as written: the user the container runs as can
//! read every file mounted for it; the image is named in one place (kustomization); Prometheus reaches the
//! admin port; replicas spread across nodes; the Docker build context leaves `target/` and `.git` out.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_norway::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// Every YAML document under deploy/kubernetes (`*.yaml`, which CI validates against the Kubernetes schemas,
/// `*.yml` and `extras/`, which hold kinds those schemas lack), with the file it came from.
struct Manifests {
    docs: Vec<(String, Value)>,
}

impl Manifests {
    fn load() -> Self {
        let mut docs = Vec::new();
        for dir in [DIR.to_owned(), format!("{DIR}/extras")] {
            let mut paths: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect();
            paths.sort();
            for path in paths {
                let text = std::fs::read_to_string(&path).unwrap();
                let file = path.strip_prefix(DIR).unwrap().display().to_string();
                let file = file.trim_start_matches('/').to_owned();
                for doc in serde_norway::Deserializer::from_str(&text) {
                    let value: Value = serde::Deserialize::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
                    assert!(value["kind"].is_string(), "{file}: a document without a kind");
                    docs.push((file.clone(), value));
                }
            }
        }
        Self { docs }
    }

    /// Every object of `kind`.
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs
            .iter()
            .filter(|(_, v)| v["kind"].as_str() == Some(kind))
            .map(|(_, v)| v)
            .collect()
    }

    /// The one object of `kind`; panics when there is none or several.
    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(all.len(), 1, "expected exactly one {kind}");
        all[0]
    }

    /// The object of `kind` named `name`.
    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|v| v["metadata"]["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no {kind} named {name}"))
    }

    /// The proxy's Deployment (redis.yaml holds another, for Redis).
    fn proxy(&self) -> &Value {
        self.named("Deployment", "zapsign-proxy")
    }

    /// The file `kind` `name` is in, relative to deploy/kubernetes.
    fn file_of(&self, kind: &str, name: &str) -> &str {
        self.docs
            .iter()
            .find(|(_, v)| v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name))
            .map(|(f, _)| f.as_str())
            .unwrap_or_else(|| panic!("no {kind} named {name}"))
    }
}

/// Kinds the strict schema check (`kubernetes-validate --strict deploy/kubernetes/*.yaml`) has no schema for.
const NO_CORE_SCHEMA: &[&str] = &["Kustomization", "ServiceMonitor"];

fn port_of(listen: &str) -> u64 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn config_toml(m: &Manifests) -> (String, toml::Value) {
    let text = m.one("ConfigMap")["data"]["proxy.toml"].as_str().unwrap().to_owned();
    let value = text.parse::<toml::Table>().map(toml::Value::Table).unwrap();
    (text, value)
}

#[test]
fn deployment_ports_probes_and_grace_agree_with_the_config() {
    let m = Manifests::load();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(!m.all(kind).is_empty(), "no {kind} under deploy/kubernetes");
    }
    let (_, cfg) = config_toml(&m);
    let proxy_port = port_of(cfg["server"]["listen"].as_str().unwrap());
    let admin_port = port_of(cfg["admin"]["listen"].as_str().unwrap());
    assert!(
        cfg["server"]["listen"].as_str().unwrap().starts_with("0.0.0.0:"),
        "must listen beyond loopback in a pod"
    );

    let d = m.proxy();
    assert_eq!(d["spec"]["replicas"].as_u64(), Some(3));
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
    assert!(m.one("ConfigMap")["data"][config_path.file_name().unwrap().to_str().unwrap()].is_string());
    let secret_data = &m.one("Secret")["stringData"];
    let password_file = Path::new(cfg["auth"]["password_file"].as_str().unwrap());
    assert_eq!(password_file.parent().unwrap(), Path::new(mounts["credentials"]));
    let name = password_file.file_name().unwrap().to_str().unwrap();
    assert!(secret_data[name].is_string(), "the Secret lacks {name}");
    let keys_file = Path::new(cfg["access"]["client_keys_file"].as_str().unwrap());
    assert!(secret_data[keys_file.file_name().unwrap().to_str().unwrap()].is_string());
}

#[test]
fn service_network_policy_and_budget_select_the_pods_and_the_right_port() {
    let m = Manifests::load();
    let (_, cfg) = config_toml(&m);
    let proxy_port = port_of(cfg["server"]["listen"].as_str().unwrap());
    let labels = &m.proxy()["spec"]["template"]["metadata"]["labels"];
    let service = m.named("Service", "zapsign-proxy");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["targetPort"].as_str(), Some("http"));
    assert_eq!(&m.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(
        &m.named("NetworkPolicy", "zapsign-proxy")["spec"]["podSelector"]["matchLabels"],
        labels
    );
    let ingress = &m.named("NetworkPolicy", "zapsign-proxy")["spec"]["ingress"][0];
    assert_eq!(ingress["ports"][0]["port"].as_u64(), Some(proxy_port));
    assert_eq!(
        ingress["from"][0]["podSelector"]["matchLabels"]["zapsign-proxy-client"].as_str(),
        Some("true"),
        "only labelled client pods may call the proxy"
    );
}

#[test]
fn configmap_config_passes_check_config_and_uses_documented_keys() {
    let m = Manifests::load();
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
        .env("ZAPSIGN_PROXY_REDIS_PASSWORD", "placeholder")
        .env(
            "ZAPSIGN_PROXY_SHARED_KEY",
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
        )
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

/// A file mode as Kubernetes reads it: YAML 1.1, where `0440` is octal (serde_norway, being YAML 1.2, hands
/// such a scalar over as a string), or a plain (decimal) number.
fn mode_of(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().map(|n| n as u32),
        Value::String(s) if s.starts_with("0o") => u32::from_str_radix(&s[2..], 8).ok(),
        Value::String(s) if s.starts_with('0') => u32::from_str_radix(s, 8).ok(),
        _ => None,
    }
}

/// The user and group `USER` sets in deploy/Dockerfile: what a container runs as when the manifests set none.
fn image_user() -> (u64, u64) {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the Dockerfile sets USER");
    let (u, g) = user.trim().split_once(':').unwrap_or((user.trim(), user.trim()));
    (u.parse().unwrap(), g.parse().unwrap())
}

/// Whether a process of `uid`, primary group `gid` and supplementary `groups` may read a file owned by
/// `owner`:`group` with `mode`, as Linux decides without capabilities (the container drops them all, so root
/// gets no override either): the owner bits when it owns the file, else the group bits when it is in the
/// file's group, else the other bits.
fn may_read(uid: u64, gid: u64, groups: &[u64], owner: u64, group: u64, mode: u32) -> bool {
    if uid == owner {
        mode & 0o400 != 0
    } else if gid == group || groups.contains(&group) {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    }
}

/// The pod crash-looped when the Secret was mounted `0440` root-owned and the pod ran as 65532 with no
/// `fsGroup`. For every container and every Secret or ConfigMap volume it mounts, each file (each `items`
/// entry, else each key of the object) is readable by the user the container runs as, given `defaultMode` /
/// `items[].mode` (default 0644), root ownership, and the group the kubelet gives files when `fsGroup` is set.
#[test]
fn the_container_user_can_read_every_mounted_secret_and_config_file() {
    let m = Manifests::load();
    let mut checked = 0;
    for deployment in m.all("Deployment") {
        checked += readable_mounts(&m, deployment);
    }
    assert!(checked >= 3, "too few mounted files checked: {checked}");
    // Secrets stay unreadable to other users in the pod: group-readable through fsGroup, not world-readable.
    let volumes = m.proxy()["spec"]["template"]["spec"]["volumes"].as_sequence().unwrap();
    let credentials = volumes.iter().find(|v| v["secret"].is_mapping()).unwrap();
    let mode = mode_of(&credentials["secret"]["defaultMode"]).expect("the Secret volume sets defaultMode");
    assert_eq!(
        mode & 0o007,
        0,
        "secret files are readable by every user: mode {mode:o}"
    );
}

/// Checks every Secret or ConfigMap file `deployment` mounts; returns how many.
fn readable_mounts(m: &Manifests, deployment: &Value) -> usize {
    let pod = &deployment["spec"]["template"]["spec"];
    let pod_sc = &pod["securityContext"];
    let (image_uid, image_gid) = image_user();
    let fs_group = pod_sc["fsGroup"].as_u64();
    let mut supplemental: Vec<u64> = pod_sc["supplementalGroups"]
        .as_sequence()
        .map(|s| s.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    supplemental.extend(fs_group);
    let volumes = pod["volumes"].as_sequence().unwrap();
    let mut checked = 0;
    for c in pod["containers"].as_sequence().unwrap() {
        let sc = &c["securityContext"];
        let uid = sc["runAsUser"]
            .as_u64()
            .or(pod_sc["runAsUser"].as_u64())
            .unwrap_or(image_uid);
        let gid = sc["runAsGroup"]
            .as_u64()
            .or(pod_sc["runAsGroup"].as_u64())
            .unwrap_or(image_gid);
        let drops_all = sc["capabilities"]["drop"]
            .as_sequence()
            .is_some_and(|d| d.iter().any(|c| c.as_str() == Some("ALL")));
        for mount in c["volumeMounts"].as_sequence().unwrap() {
            let name = mount["name"].as_str().unwrap();
            let volume = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            let (source, keys): (&Value, Vec<String>) = if volume["secret"].is_mapping() {
                let secret = m.named("Secret", volume["secret"]["secretName"].as_str().unwrap());
                let keys = ["data", "stringData"]
                    .iter()
                    .filter_map(|f| secret[*f].as_mapping())
                    .flat_map(|map| map.keys().map(|k| k.as_str().unwrap().to_owned()))
                    .collect();
                (&volume["secret"], keys)
            } else if volume["configMap"].is_mapping() {
                let cm = m.named("ConfigMap", volume["configMap"]["name"].as_str().unwrap());
                let keys = cm["data"]
                    .as_mapping()
                    .unwrap()
                    .keys()
                    .map(|k| k.as_str().unwrap().to_owned())
                    .collect();
                (&volume["configMap"], keys)
            } else {
                continue;
            };
            let default_mode = match &source["defaultMode"] {
                Value::Null => 0o644,
                v => mode_of(v).unwrap_or_else(|| panic!("volume {name}: defaultMode {v:?} is no mode")),
            };
            // The files: each `items` entry with its own mode, else each key with the default mode.
            let files: Vec<(String, u32)> = match source["items"].as_sequence() {
                Some(items) => items
                    .iter()
                    .map(|i| {
                        let mode = match &i["mode"] {
                            Value::Null => default_mode,
                            v => mode_of(v).unwrap(),
                        };
                        (i["path"].as_str().unwrap().to_owned(), mode)
                    })
                    .collect(),
                None => keys.into_iter().map(|k| (k, default_mode)).collect(),
            };
            assert!(!files.is_empty(), "volume {name} mounts no file");
            // Secret and ConfigMap files belong to root; with fsGroup the kubelet gives them that group.
            let group = fs_group.unwrap_or(0);
            for (file, mode) in files {
                let readable = (uid == 0 && !drops_all) || may_read(uid, gid, &supplemental, 0, group, mode);
                assert!(
                    readable,
                    "container {} runs as {uid}:{gid} (groups {supplemental:?}) and cannot read {}/{file} \
                     (root:{group}, mode {mode:o}): set the pod's fsGroup to its group, or a mode others can read",
                    c["name"].as_str().unwrap_or("?"),
                    mount["mountPath"].as_str().unwrap()
                );
                checked += 1;
            }
        }
    }
    checked
}

#[test]
fn the_readability_rule_matches_what_linux_does() {
    // The manifests before issue 9: root-owned 0440, the pod running as 65532 with no fsGroup.
    assert!(!may_read(65532, 65532, &[], 0, 0, 0o440));
    assert!(may_read(65532, 65532, &[65532], 0, 65532, 0o440));
    assert!(may_read(65532, 65532, &[], 0, 0, 0o444));
    assert!(may_read(65532, 1000, &[65532], 0, 65532, 0o440));
    assert!(!may_read(65532, 65532, &[65532], 0, 65532, 0o400));
    assert_eq!(mode_of(&Value::String("0440".into())), Some(0o440));
    assert_eq!(mode_of(&Value::Number(288.into())), Some(0o440));
}

/// `kubectl apply -k deploy/kubernetes` applies every manifest but the example Secret, and the image is set in
/// one place: the kustomization's `images:` entry names the Deployment's image.
#[test]
fn the_kustomization_lists_every_manifest_and_names_the_image_once() {
    let m = Manifests::load();
    let k = m.one("Kustomization");
    assert_eq!(
        m.docs
            .iter()
            .find(|(_, v)| v["kind"] == "Kustomization")
            .map(|(f, _)| f.as_str()),
        Some("kustomization.yml"),
        "kustomize looks for kustomization.yaml, .yml or Kustomization; .yml keeps it out of the *.yaml schema check"
    );
    let resources: Vec<&str> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for (file, v) in &m.docs {
        let kind = v["kind"].as_str().unwrap();
        let listed = resources.contains(&file.as_str());
        match kind {
            "Kustomization" => {}
            // Created out of band; needs the Prometheus Operator's CRDs.
            "Secret" | "ServiceMonitor" => assert!(!listed, "{file} must not be applied by the kustomization"),
            _ => assert!(listed, "{file} ({kind}) is missing from kustomization.yml resources"),
        }
        if NO_CORE_SCHEMA.contains(&kind) {
            assert!(
                file.contains('/') || !file.ends_with(".yaml"),
                "{file}: {kind} has no core schema; keep it out of deploy/kubernetes/*.yaml (CI validates those strictly)"
            );
        }
    }
    for r in &resources {
        assert!(
            Path::new(DIR).join(r).is_file(),
            "kustomization.yml lists {r}, which does not exist"
        );
    }
    let image = m.proxy()["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap();
    let image_name = image.rsplit_once(':').map_or(image, |(n, _)| n);
    let images = k["images"].as_sequence().expect("kustomization.yml sets images");
    assert_eq!(images.len(), 1);
    assert_eq!(
        images[0]["name"].as_str(),
        Some(image_name),
        "images[0].name must match the Deployment's image"
    );
    assert!(images[0]["newName"].is_string() && images[0]["newTag"].is_string());
}

/// Prometheus reaches `/metrics` on the admin port: a metrics Service on it, a ServiceMonitor selecting that
/// Service, scrape annotations for annotation-based set-ups, and the NetworkPolicy admitting scrapers there.
#[test]
fn prometheus_can_scrape_the_admin_port() {
    let m = Manifests::load();
    let (_, cfg) = config_toml(&m);
    let admin_port = port_of(cfg["admin"]["listen"].as_str().unwrap());
    let template = &m.proxy()["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    let container = &template["spec"]["containers"][0];
    let admin_name = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(admin_port))
        .and_then(|p| p["name"].as_str())
        .expect("a named container port for the admin listener");

    // The metrics Service: selects the pods, targets the admin port.
    let metrics =
        m.all("Service")
            .into_iter()
            .find(|s| {
                s["spec"]["ports"].as_sequence().unwrap().iter().any(|p| {
                    p["targetPort"].as_str() == Some(admin_name) || p["targetPort"].as_u64() == Some(admin_port)
                })
            })
            .expect("a Service on the admin port");
    assert_eq!(&metrics["spec"]["selector"], labels);
    let metrics_port = metrics["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["targetPort"].as_str() == Some(admin_name))
        .unwrap();
    // The callers' Service never exposes the admin port.
    let callers = m.named("Service", "zapsign-proxy");
    assert!(!callers["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["targetPort"].as_str() == Some(admin_name)));

    // The ServiceMonitor selects the metrics Service (and only it) and scrapes its port by name.
    let sm = m.one("ServiceMonitor");
    assert!(m.file_of("ServiceMonitor", "zapsign-proxy").starts_with("extras/"));
    let selector = sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap();
    for service in m.all("Service") {
        let selected = selector
            .iter()
            .all(|(k, v)| &service["metadata"]["labels"][k.as_str().unwrap()] == v);
        let is_metrics = std::ptr::eq(service, metrics);
        assert_eq!(
            selected,
            is_metrics,
            "the ServiceMonitor must select the metrics Service only (selected {})",
            service["metadata"]["name"].as_str().unwrap()
        );
    }
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], metrics_port["name"]);
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));

    // Scrape annotations name the admin port and path.
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin_port.to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));

    // The NetworkPolicy lets labelled scrapers in on the admin port.
    let np = m.named("NetworkPolicy", "zapsign-proxy");
    assert!(np["spec"]["ingress"].as_sequence().unwrap().iter().any(|rule| {
        rule["ports"][0]["port"].as_u64() == Some(admin_port)
            && rule["from"][0]["podSelector"]["matchLabels"]["zapsign-proxy-scraper"].as_str() == Some("true")
    }));
}

/// Losing one node never takes every replica: a spread constraint over `kubernetes.io/hostname` selecting the
/// pods, enforced (not only preferred).
#[test]
fn replicas_spread_across_nodes() {
    let m = Manifests::load();
    let template = &m.proxy()["spec"]["template"];
    let labels = &template["metadata"]["labels"];
    let constraints = template["spec"]["topologySpreadConstraints"]
        .as_sequence()
        .expect("topologySpreadConstraints on the pod template");
    let by_node = constraints
        .iter()
        .find(|c| c["topologyKey"].as_str() == Some("kubernetes.io/hostname"))
        .expect("a spread across nodes");
    assert_eq!(by_node["maxSkew"].as_u64(), Some(1));
    assert_eq!(by_node["whenUnsatisfiable"].as_str(), Some("DoNotSchedule"));
    assert_eq!(&by_node["labelSelector"]["matchLabels"], labels);
}

/// The README's operating section tells which Kubernetes the `preStop` sleep handler needs (beta and on by
/// default since 1.30, GA in 1.34).
#[test]
fn the_readme_names_the_kubernetes_version_the_pre_stop_sleep_needs() {
    let m = Manifests::load();
    let container = &m.proxy()["spec"]["template"]["spec"]["containers"][0];
    if container["lifecycle"]["preStop"]["sleep"].is_mapping() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let kubernetes = &readme[readme.find("### Kubernetes").expect("a Kubernetes section")..];
        assert!(
            kubernetes.contains("1.30") && kubernetes.contains("PodLifecycleSleepAction"),
            "the README's Kubernetes section must name the version the preStop sleep action needs"
        );
    }
}

/// `docker build -f deploy/Dockerfile .` sends the repository root as context: `.dockerignore` keeps `target/`
/// (gigabytes), `.git` and fuzz artifacts out, and keeps in everything the Dockerfile copies.
#[test]
fn the_docker_build_context_leaves_target_and_git_out() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ignore = std::fs::read_to_string(format!("{root}/.dockerignore")).expect("a .dockerignore at the root");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let excluded = |path: &str| {
        // Enough of Docker's matching for these patterns: a directory prefix, or `*.ext` at the root.
        let mut out = false;
        for p in &patterns {
            let (negate, p) = p.strip_prefix('!').map_or((false, *p), |rest| (true, rest));
            let p = p.trim_start_matches("**/").trim_end_matches('/');
            let hit = match p.strip_prefix('*') {
                Some(ext) => !path.contains('/') && path.ends_with(ext),
                None => path == p || path.starts_with(&format!("{p}/")),
            };
            if hit {
                out = !negate;
            }
        }
        out
    };
    for gone in [
        "target",
        "target/debug/zapsign-proxy",
        ".git",
        "fuzz/target",
        "fuzz/artifacts",
    ] {
        assert!(excluded(gone), "{gone} is sent to the Docker build");
    }
    let dockerfile = std::fs::read_to_string(format!("{root}/deploy/Dockerfile")).unwrap();
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        for src in &words[1..words.len() - 1] {
            assert!(
                !excluded(src),
                "the Dockerfile copies {src}, which .dockerignore leaves out"
            );
            assert!(
                Path::new(root).join(src).exists(),
                "the Dockerfile copies {src}, which does not exist"
            );
        }
    }
}

/// Issue 11: the replicas share one account through the Redis in redis.yaml: the config points at its Service,
/// the key and the Redis password come from the Secret, `shared.replicas` is the Deployment's count, the
/// proxy's NetworkPolicy lets it reach Redis (and Redis's lets only the proxy in), and Redis gets its password
/// from the same Secret.
#[test]
fn the_replicas_share_state_through_the_redis_in_the_manifests() {
    let m = Manifests::load();
    let (_, cfg) = config_toml(&m);
    let shared = &cfg["shared"];
    assert_eq!(
        shared["replicas"].as_integer().map(|r| r as u64),
        m.proxy()["spec"]["replicas"].as_u64(),
        "shared.replicas must equal the Deployment's replicas"
    );
    assert_eq!(
        cfg["pacing"]["limit"].as_integer(),
        Some(500),
        "the account's whole budget, shared"
    );
    let url = shared["redis_url"].as_str().unwrap();
    let rest = url.strip_prefix("redis://").expect("redis:// URL");
    let (host, port) = rest.split('/').next().unwrap().split_once(':').unwrap();
    let port: u64 = port.parse().unwrap();
    let service = m.named("Service", host);
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(port));
    let redis = m.named("Deployment", "zapsign-proxy-redis");
    let redis_labels = &redis["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"],
        redis_labels["app.kubernetes.io/name"]
    );

    let secret = &m.one("Secret")["stringData"];
    let credentials_dir = m.proxy()["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str() == Some("credentials"))
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    for key in ["key_file", "redis_password_file"] {
        let path = Path::new(shared[key].as_str().unwrap());
        assert_eq!(path.parent().unwrap(), Path::new(&credentials_dir), "{key}");
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(secret[name].is_string(), "the Secret lacks {name} ({key})");
    }
    let password_ref = &redis["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"];
    assert_eq!(password_ref["name"], m.one("Secret")["metadata"]["name"]);
    assert_eq!(
        Some(password_ref["key"].as_str().unwrap()),
        Path::new(shared["redis_password_file"].as_str().unwrap())
            .file_name()
            .and_then(|f| f.to_str())
    );

    let egress = m.named("NetworkPolicy", "zapsign-proxy")["spec"]["egress"]
        .as_sequence()
        .unwrap();
    assert!(
        egress.iter().any(|rule| {
            rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                == redis_labels["app.kubernetes.io/name"]
                && rule["ports"][0]["port"].as_u64() == Some(port)
        }),
        "the proxy's NetworkPolicy does not let it reach Redis"
    );
    let redis_np = m.named("NetworkPolicy", "zapsign-proxy-redis");
    assert_eq!(
        redis_np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        m.proxy()["spec"]["template"]["metadata"]["labels"]
    );
    let k = m.one("Kustomization");
    assert!(k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|r| r.as_str() == Some(m.file_of("Deployment", "zapsign-proxy-redis"))));
}
