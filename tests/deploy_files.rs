//! Deployment files cannot be run here (no Docker engine, no cluster): check that they parse
//! and agree with the code — environment overrides and the ConfigMap are valid configuration,
//! ports and probe paths are the ones the worker serves, the dashboard only uses metrics the
//! worker exports, KEDA watches the configured group and topic.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn to_json(y: &Yaml) -> Value {
    match y {
        Yaml::Real(s) => s.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::from(s.clone()),
        Yaml::Boolean(b) => Value::from(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        other => format!("{other:?}"),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// One YAML document as JSON (panics with the file name on a syntax error).
fn yaml(path: &str) -> Value {
    let docs = YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(docs.len(), 1, "{path}: one document");
    to_json(&docs[0])
}

fn load_config(text: &str, env: Vec<(String, String)>) -> convoflow::config::Config {
    let dir = std::env::temp_dir().join(format!("convoflow-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{}.yaml", env.len()));
    std::fs::write(&file, text).unwrap();
    convoflow::config::Config::load_with_env(Some(&file), env).unwrap()
}

#[test]
fn compose_file_parses_and_agrees_with_the_worker() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "topics", "qdrant", "convoflow", "producer", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let worker = &services["convoflow"];
    let overrides: Vec<(String, String)> = worker["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let cfg = load_config(&read("convoflow.yaml"), overrides);
    assert_eq!(cfg.kafka.brokers, "kafka:9092");
    assert_eq!(cfg.qdrant.backend, convoflow::config::StoreBackend::Qdrant);
    assert_eq!(cfg.qdrant.url, "http://qdrant:6334");
    assert_eq!(cfg.telemetry.listen, "0.0.0.0:9464");
    assert!(worker["ports"].as_array().unwrap().iter().any(|p| p == "9464:9464"));
    assert_eq!(worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"], "nvidia");
    assert!(worker["healthcheck"]["test"][1].as_str().unwrap().contains("/readyz"));
    let producer_cmd = services["producer"]["command"].as_array().unwrap();
    assert!(producer_cmd.iter().any(|a| a == "/etc/convoflow/convoflow.yaml"));
    // mounted files exist in the repository
    for service in ["prometheus", "grafana"] {
        for volume in services[service]["volumes"].as_array().unwrap() {
            let host = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(root().join(host).exists(), "{service} mounts {host}");
        }
    }
}

#[test]
fn dockerfile_builds_with_the_pinned_toolchain_and_libtorch() {
    let dockerfile = read("Dockerfile");
    let toolchain = read("rust-toolchain.toml");
    let channel = toolchain.lines().find_map(|l| l.strip_prefix("channel = ")).unwrap().trim_matches('"');
    assert!(dockerfile.contains(&format!("--default-toolchain {channel}")), "the image uses the pinned Rust");
    assert!(dockerfile.contains("COPY rust-toolchain.toml"));
    let torch = read("scripts/fixtures/requirements.txt");
    let torch_pin = torch.lines().find(|l| l.starts_with("torch==")).unwrap().trim();
    assert!(dockerfile.contains(torch_pin), "the image's libtorch is the tested {torch_pin}");
    assert!(dockerfile.contains("/etc/convoflow/convoflow.yaml") && dockerfile.contains("EXPOSE 9464"));
}

/// Metric names an expression refers to, without histogram suffixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("convoflow_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn dashboard_and_prometheus_config_use_what_the_worker_exports() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/convoflow.json")).unwrap();
    let exported: BTreeSet<&str> = convoflow::telemetry::ALL.iter().copied().collect();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            used.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    for name in &used {
        assert!(exported.contains(name.as_str()), "the dashboard uses {name}, which the worker does not export");
    }
    for needed in ["convoflow_consumer_lag", "convoflow_end_to_end_seconds", "convoflow_batch_turns", "convoflow_gpu_memory_used_bytes",
        "convoflow_gpu_utilization_ratio", "convoflow_dlq_messages_total", "convoflow_store_upsert_seconds", "convoflow_turns_total"]
    {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let target = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0];
    assert_eq!(target, "convoflow:9464");
    assert_eq!(yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"][0]["uid"], "prometheus");
    assert_eq!(
        yaml("deploy/grafana/provisioning/dashboards/convoflow.yml")["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}

#[test]
fn kubernetes_manifests_agree_with_the_configuration() {
    let configmap = yaml("deploy/k8s/configmap.yaml");
    let deployment = yaml("deploy/k8s/deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // secrets reach the worker only as environment overrides from Secrets
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["valueFrom"]["secretKeyRef"]["name"].is_string(), "{e}: from a Secret");
            (e["name"].as_str().unwrap().to_string(), format!("from-{}", e["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap()))
        })
        .collect();
    let text = configmap["data"]["convoflow.yaml"].as_str().unwrap();
    assert!(!text.contains("password:") && !text.contains("api_key:"), "no secret in the ConfigMap");
    let cfg = load_config(text, env);
    let port: u16 = cfg.telemetry.listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container["ports"][0]["containerPort"], port);
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], 1);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace * 1000 > cfg.pipeline.shutdown_timeout_ms, "SIGTERM gets time to drain");
    assert_eq!(pod["volumes"][0]["configMap"]["name"], configmap["metadata"]["name"]);
    let labels = &deployment["spec"]["selector"]["matchLabels"];

    let service = yaml("deploy/k8s/service.yaml");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["port"], port);
    let pdb = yaml("deploy/k8s/pdb.yaml");
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    let keda = yaml("deploy/k8s/keda-scaledobject.yaml");
    assert_eq!(keda["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let trigger = &keda["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    assert_eq!(trigger["metadata"]["consumerGroup"], cfg.kafka.group_id.as_str());
    assert_eq!(trigger["metadata"]["topic"], cfg.kafka.input_topic.as_str());
    assert_eq!(trigger["metadata"]["bootstrapServers"], cfg.kafka.brokers.as_str());
    let auth = yaml("deploy/k8s/keda-trigger-auth.yaml");
    assert_eq!(trigger["authenticationRef"]["name"], auth["metadata"]["name"]);

    // the secrets land in the redacted settings they are meant for
    assert_eq!(cfg.kafka.security.protocol, convoflow::config::SecurityProtocol::SaslSsl);
    assert!(cfg.qdrant.url.starts_with("https://"), "Qdrant over TLS");
    let with_secrets = &cfg;
    assert_eq!(with_secrets.kafka.security.sasl.password.as_ref().unwrap().expose(), "from-sasl-password");
    assert_eq!(with_secrets.codec.schema_registry.as_ref().unwrap().password.as_ref().unwrap().expose(), "from-password");
    assert_eq!(with_secrets.qdrant.api_key.as_ref().unwrap().expose(), "from-api-key");
    let shown = format!("{with_secrets:?}");
    assert!(!shown.contains("from-sasl-password") && !shown.contains("from-api-key"), "Debug redacts secrets");
    let tls_mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "tls").unwrap();
    let ca = cfg.kafka.security.tls.ca.as_ref().unwrap();
    assert!(ca.starts_with(tls_mount["mountPath"].as_str().unwrap()), "the CA file is mounted");
}
