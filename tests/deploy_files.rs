//! Deployment files cannot be run here (no Docker engine, no cluster): check that they parse
//! and agree with the code — environment overrides and the ConfigMap are valid configuration,
//! ports and probe paths are the ones the worker serves, the dashboard only uses metrics the
//! worker exports, KEDA watches the configured group and topic. The LLM profile (vLLM and
//! `convoflow serve`) is checked the same way: vLLM serves the model serve asks for, on the port
//! serve's URL names, within the GPU memory budget it shares with the encoders.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    // one file per call: the tests run in parallel threads of one process
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let file = dir.join(format!("{}.yaml", CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    std::fs::write(&file, text).unwrap();
    convoflow::config::Config::load_with_env(Some(&file), env).unwrap()
}

/// A container's environment as overrides: plain values as they are, Secret references as
/// `from-<secret>/<key>`. A name that looks like a secret must come from a Secret.
fn env_overrides(container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let secret = &e["valueFrom"]["secretKeyRef"];
            if secret["name"].is_string() {
                (name, format!("from-{}/{}", secret["name"].as_str().unwrap(), secret["key"].as_str().unwrap()))
            } else {
                assert!(
                    !["API_KEY", "PASSWORD", "TOKEN", "SECRET"].iter().any(|w| name.contains(w)),
                    "{name}: a secret, from a Secret (secretKeyRef), never a plain value"
                );
                (name, e["value"].as_str().unwrap_or_else(|| panic!("{e}: a value")).to_string())
            }
        })
        .collect()
}

/// The value of `--name=value` (or `--name value`) in a vLLM argument list.
fn flag(args: &Value, name: &str) -> String {
    let args: Vec<&str> = args.as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let long = format!("--{name}");
    args.iter()
        .enumerate()
        .find_map(|(i, a)| {
            a.strip_prefix(&format!("{long}=")).map(str::to_string).or_else(|| (*a == long).then(|| args[i + 1].to_string()))
        })
        .unwrap_or_else(|| panic!("vLLM argument {long} in {args:?}"))
}

/// Host and port of an http:// URL.
fn host_port(url: &str) -> (String, u16) {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("{url}: http://"));
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority.rsplit_once(':').unwrap_or_else(|| panic!("{url}: an explicit port"));
    (host.to_string(), port.parse().unwrap())
}

fn listen_port(listen: &str) -> u16 {
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

const GIB: f64 = (1u64 << 30) as f64;
/// The card the compose stack shares between vLLM, the worker and serve.
const CARD_GIB: f64 = 24.0;
/// The worker's three fp16 encoders, libtorch reserved at peak (docs/performance.md).
const WORKER_GIB: f64 = 4.3;
/// One CUDA context per process (vLLM, worker, serve).
const CUDA_CONTEXT_GIB: f64 = 0.5;
/// The reference budget of the whole stack on the card.
const BUDGET_BYTES: f64 = 16.5e9;

#[test]
fn compose_file_parses_and_agrees_with_the_worker() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    for name in ["kafka", "topics", "qdrant", "convoflow", "producer", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    for name in ["kafka", "topics", "qdrant", "convoflow", "prometheus", "grafana"] {
        assert!(services[name].get("profiles").is_none(), "{name} starts with a plain `docker compose up`");
    }
    let worker = &services["convoflow"];
    let overrides: Vec<(String, String)> = worker["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let cfg = load_config(&read("convoflow.yaml"), overrides);
    assert_models_are_mounted(worker, &cfg);
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

/// Every model folder the service's config names (relative paths from its working directory)
/// is under its `./models:/models:ro` mount.
fn assert_models_are_mounted(service: &Value, cfg: &convoflow::config::Config) {
    assert!(service["volumes"].as_array().unwrap().iter().any(|v| v == "./models:/models:ro"));
    let cwd = Path::new(service["working_dir"].as_str().expect("a working_dir: the config's model paths are relative"));
    let models = &cfg.models;
    let paths: Vec<PathBuf> =
        models.embedding.iter().chain(models.ner.iter()).chain(models.sentiment.iter()).map(|m| cwd.join(&m.path)).collect();
    assert_eq!(paths.len(), 4, "embedding, the two routed NER models, sentiment");
    for p in paths {
        let p: PathBuf = p.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect();
        assert!(p.starts_with("/models/") && p.components().count() == 3, "{} is not under the /models mount", p.display());
    }
}

/// Profile `llm`: vLLM serves the model `convoflow serve` asks for, where serve's URL points,
/// within the GPU budget shared with the encoders; serve uses the worker's Qdrant.
#[test]
fn compose_llm_profile_agrees_with_serve() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().unwrap();
    let vllm = &services["vllm"];
    let serve = &services["serve"];
    for (name, service) in [("vllm", vllm), ("serve", serve)] {
        assert_eq!(service["profiles"], serde_json::json!(["llm"]), "{name} only with --profile llm");
        assert_eq!(service["deploy"]["resources"]["reservations"]["devices"][0]["driver"], "nvidia", "{name} on the GPU");
    }
    let image = vllm["image"].as_str().unwrap();
    let tag = image.strip_prefix("vllm/vllm-openai:v").unwrap_or_else(|| panic!("{image}: a pinned vllm/vllm-openai release"));
    assert!(tag.split('.').all(|n| n.parse::<u32>().is_ok()), "{image}: a version tag");

    let env_of = |service: &Value| -> Vec<(String, String)> {
        service["environment"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
    };
    let cfg = load_config(&read("convoflow.yaml"), env_of(serve));
    assert_models_are_mounted(serve, &cfg);
    let worker = load_config(&read("convoflow.yaml"), env_of(&services["convoflow"]));

    // the model serve asks for is the one vLLM serves, quantized, in the context serve budgets for
    let args = &vllm["command"];
    assert_eq!(flag(args, "served-model-name"), cfg.llm.model);
    assert_eq!(flag(args, "model"), "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ");
    assert_eq!(flag(args, "quantization"), "gptq");
    assert_eq!(flag(args, "max-model-len").parse::<usize>().unwrap(), cfg.llm.context_tokens);
    assert_eq!(cfg.llm.context_tokens, 8192);
    assert!(flag(args, "max-num-seqs").parse::<usize>().unwrap() >= cfg.serve.max_concurrent_requests, "vLLM runs every admitted question");

    // serve's URL is the vllm service's port, published and checked on /health
    assert!(cfg.llm.is_configured() && cfg.llm.url.ends_with("/v1"), "{}", cfg.llm.url);
    let (host, port) = host_port(&cfg.llm.url);
    assert_eq!(host, "vllm");
    assert_eq!(flag(args, "port").parse::<u16>().unwrap(), port);
    assert!(vllm["ports"].as_array().unwrap().iter().any(|p| p.as_str() == Some(&format!("{port}:{port}"))));
    assert!(vllm["healthcheck"]["test"][1].as_str().unwrap().contains(&format!(":{port}/health")));
    assert!(
        vllm["volumes"].as_array().unwrap().iter().any(|v| v == "hf-cache:/root/.cache/huggingface"),
        "the HuggingFace cache survives restarts"
    );
    assert!(compose["volumes"].as_object().unwrap().contains_key("hf-cache"));

    // GPU memory: vLLM takes 4.5–6.5 GiB of the 24 GiB card, and the whole stack stays in budget
    let utilization: f64 = flag(args, "gpu-memory-utilization").parse().unwrap();
    let llm_gib = utilization * CARD_GIB;
    assert!((4.5..=6.5).contains(&llm_gib), "vLLM takes {llm_gib:.2} GiB of {CARD_GIB} GiB");
    let serve_gib = cfg.gpu.memory_fraction * CARD_GIB;
    let total_gib = llm_gib + WORKER_GIB + serve_gib + 3.0 * CUDA_CONTEXT_GIB;
    assert!(total_gib * GIB <= BUDGET_BYTES, "vLLM {llm_gib:.2} + worker {WORKER_GIB} + serve {serve_gib:.2} + contexts = {total_gib:.2} GiB");

    // serve: `convoflow serve` on the image's config, on every interface, against the worker's Qdrant
    assert_eq!(serve["command"], serde_json::json!(["serve", "--config", "/etc/convoflow/convoflow.yaml"]));
    let (listen_host, listen) = cfg.serve.listen.rsplit_once(':').unwrap();
    assert_eq!((listen_host, listen), ("0.0.0.0", "8080"));
    assert!(serve["ports"].as_array().unwrap().iter().any(|p| p.as_str() == Some(&format!("{listen}:{listen}"))));
    let check = serve["healthcheck"]["test"][1].as_str().unwrap();
    assert!(check.contains(&format!("/dev/tcp/127.0.0.1/{listen} ")) && check.contains("GET /healthz"), "{check}");
    assert_eq!(cfg.qdrant.backend, worker.qdrant.backend);
    assert_eq!(cfg.qdrant.url, worker.qdrant.url);
    assert_eq!(cfg.qdrant.collection, worker.qdrant.collection);
    let embedding = |c: &convoflow::config::Config| c.models.embedding.as_ref().unwrap().path.clone();
    assert_eq!(embedding(&cfg), embedding(&worker), "queries embedded with the model that indexed the turns");
    assert!(serve["volumes"].as_array().unwrap().iter().any(|v| v == "./models:/models:ro"));
    assert!(cfg.serve.api_key.is_none() && cfg.llm.api_key.is_none(), "no secret in the compose file");
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
    use convoflow::telemetry as t;
    for needed in ["convoflow_consumer_lag", "convoflow_end_to_end_seconds", "convoflow_batch_turns", "convoflow_gpu_memory_used_bytes",
        "convoflow_gpu_utilization_ratio", "convoflow_dlq_messages_total", "convoflow_store_upsert_seconds", "convoflow_turns_total",
        // the API and the LLM (convoflow serve)
        t::API_REQUESTS, t::API_REQUEST_SECONDS, t::API_IN_FLIGHT, t::LLM_REQUESTS, t::LLM_FIRST_TOKEN_SECONDS, t::LLM_TOKENS,
        t::LLM_TOKENS_PER_SECOND]
    {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    assert_eq!(t::API_REQUEST_SECONDS, "convoflow_api_request_seconds");
    assert_eq!(t::LLM_FIRST_TOKEN_SECONDS, "convoflow_llm_first_token_seconds");
    // latencies are quantiles of the histograms' buckets: the API's per route, p50 and p99
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap()))
        .collect();
    for q in ["0.5", "0.99"] {
        for (histogram, by) in [(t::API_REQUEST_SECONDS, "le, route"), (t::LLM_FIRST_TOKEN_SECONDS, "le")] {
            let expr = format!("histogram_quantile({q}, sum by ({by}) (rate({histogram}_bucket[");
            assert!(exprs.iter().any(|e| e.starts_with(&expr)), "the dashboard shows {expr}…");
        }
    }
    // panel ids unique, panels on the 24-column grid, none over another
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let rect = |p: &Value| {
        let g = &p["gridPos"];
        let n = |k: &str| g[k].as_u64().unwrap_or_else(|| panic!("{}: gridPos.{k}", p["title"]));
        (n("x"), n("y"), n("w"), n("h"))
    };
    for (i, a) in panels.iter().enumerate() {
        let (ax, ay, aw, ah) = rect(a);
        assert!(aw > 0 && ah > 0 && ax + aw <= 24, "{}: on the grid", a["title"]);
        for b in &panels[i + 1..] {
            let (bx, by, bw, bh) = rect(b);
            let apart = ax + aw <= bx || bx + bw <= ax || ay + ah <= by || by + bh <= ay;
            assert!(apart, "panels {} and {} overlap", a["title"], b["title"]);
        }
    }
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let target = &prometheus["scrape_configs"][0]["static_configs"][0]["targets"][0];
    assert_eq!(target, "convoflow:9464");
    // convoflow serve is scraped too: the compose service on its listen port, and the Kubernetes
    // pods of serve-deployment.yaml on their named port
    let scrapes = prometheus["scrape_configs"].as_array().unwrap();
    let compose = yaml("docker-compose.yml");
    let serve_env: Vec<(String, String)> = compose["services"]["serve"]["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let serve_target = format!("serve:{}", listen_port(&load_config(&read("convoflow.yaml"), serve_env).serve.listen));
    assert!(
        scrapes.iter().any(|s| s["static_configs"][0]["targets"].as_array().is_some_and(|t| t.iter().any(|t| t == serve_target.as_str()))),
        "Prometheus scrapes {serve_target}"
    );
    let serve_pods = yaml("deploy/k8s/serve-deployment.yaml")["spec"]["template"].clone();
    let pod_name = &serve_pods["metadata"]["labels"]["app.kubernetes.io/name"];
    let port_name = &serve_pods["spec"]["containers"][0]["ports"][0]["name"];
    let keeps = |s: &Value, label: &str, regex: &Value| {
        s["relabel_configs"].as_array().is_some_and(|r| {
            r.iter().any(|c| c["action"] == "keep" && c["source_labels"][0] == label && &c["regex"] == regex)
        })
    };
    assert!(
        scrapes.iter().any(|s| keeps(s, "__meta_kubernetes_pod_label_app_kubernetes_io_name", pod_name)
            && keeps(s, "__meta_kubernetes_pod_container_port_name", port_name)),
        "Prometheus scrapes the {pod_name} pods on their {port_name} port"
    );
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

/// vLLM and `convoflow serve` in the cluster: serve loads the shared ConfigMap, its secrets come
/// from Secrets, its port and probes are the API's; vLLM runs the compose file's arguments, serves
/// the configured model behind the Service that llm.url names, with the key serve sends.
#[test]
fn kubernetes_llm_manifests_agree_with_the_configuration() {
    let configmap = yaml("deploy/k8s/configmap.yaml");
    let worker = yaml("deploy/k8s/deployment.yaml");
    let serve = yaml("deploy/k8s/serve-deployment.yaml");
    assert_eq!(serve["kind"], "Deployment");
    let pod = &serve["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"], serde_json::json!(["serve", "--config", "/etc/convoflow/convoflow.yaml"]));
    assert_eq!(container["image"], worker["spec"]["template"]["spec"]["containers"][0]["image"], "the worker's image");
    let config_volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["configMap"]["name"] == configmap["metadata"]["name"]);
    let config_mount = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/etc/convoflow").unwrap();
    assert_eq!(config_mount["name"], config_volume.expect("the ConfigMap is a volume")["name"]);

    // the secrets come from Secrets (env_overrides refuses a secret as a plain value)
    let env = env_overrides(container);
    for name in ["CONVOFLOW__SERVE__API_KEY", "CONVOFLOW__LLM__API_KEY"] {
        let e = container["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{name}"));
        assert!(e["valueFrom"]["secretKeyRef"]["name"].is_string(), "{name} from a Secret");
    }
    let text = configmap["data"]["convoflow.yaml"].as_str().unwrap();
    let cfg = load_config(text, env);
    assert_eq!(cfg.serve.api_key.as_ref().unwrap().expose(), "from-convoflow-serve/api-key");
    assert_eq!(cfg.llm.api_key.as_ref().unwrap().expose(), "from-convoflow-llm/api-key");
    assert!(cfg.kafka.security.sasl.password.is_none(), "serve gets no Kafka credentials");
    let shown = format!("{cfg:?}");
    assert!(!shown.contains("from-convoflow-serve") && !shown.contains("from-convoflow-llm"), "Debug redacts secrets");

    // the API's port and probes
    let port = listen_port(&cfg.serve.listen);
    assert!(cfg.serve.listen.starts_with("0.0.0.0:"), "serve.listen reachable from other pods");
    assert_eq!(container["ports"][0]["containerPort"], port);
    let port_name = &container["ports"][0]["name"];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(&container[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    let labels = &serve["spec"]["selector"]["matchLabels"];
    assert_eq!(&serve["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"], &labels["app.kubernetes.io/name"]);
    assert_ne!(labels, &worker["spec"]["selector"]["matchLabels"], "the workers' Service, PDB and scaler never select serve pods");
    let service = yaml("deploy/k8s/serve-service.yaml");
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(service["spec"]["ports"][0]["port"], port);
    assert_eq!(&service["spec"]["ports"][0]["targetPort"], port_name);

    // vLLM: the compose file's arguments, the model and context serve is configured for
    let vllm = yaml("deploy/k8s/vllm-deployment.yaml");
    assert_eq!(vllm["kind"], "Deployment");
    let vllm_pod = &vllm["spec"]["template"]["spec"];
    let server = &vllm_pod["containers"][0];
    let compose = yaml("docker-compose.yml");
    assert_eq!(server["image"], compose["services"]["vllm"]["image"]);
    let args = &server["args"];
    assert_eq!(args, &compose["services"]["vllm"]["command"], "the same vLLM arguments as docker-compose.yml");
    assert_eq!(flag(args, "served-model-name"), cfg.llm.model);
    assert_eq!(flag(args, "max-model-len").parse::<usize>().unwrap(), cfg.llm.context_tokens);
    assert!(flag(args, "max-num-seqs").parse::<usize>().unwrap() >= cfg.serve.max_concurrent_requests);
    assert_eq!(server["resources"]["limits"]["nvidia.com/gpu"], 1);
    let vllm_port_name = &server["ports"][0]["name"];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(server[probe]["httpGet"]["path"], "/health", "{probe}");
        assert_eq!(&server[probe]["httpGet"]["port"], vllm_port_name, "{probe}");
    }
    // llm.url names the vLLM Service and its port, which reaches the container's port
    let (host, url_port) = host_port(&cfg.llm.url);
    assert!(cfg.llm.url.ends_with("/v1"), "{}", cfg.llm.url);
    let vllm_service = yaml("deploy/k8s/vllm-service.yaml");
    assert_eq!(host.split('.').next().unwrap(), vllm_service["metadata"]["name"].as_str().unwrap());
    assert_eq!(vllm_service["spec"]["ports"][0]["port"], url_port);
    assert_eq!(&vllm_service["spec"]["ports"][0]["targetPort"], vllm_port_name);
    assert_eq!(&vllm_service["spec"]["selector"], &vllm["spec"]["selector"]["matchLabels"]);
    assert_eq!(server["ports"][0]["containerPort"], flag(args, "port").parse::<u16>().unwrap());
    // vLLM requires the key serve sends, from the same Secret; the HF token (optional) from a Secret
    let ref_of = |c: &Value, name: &str| {
        let e = c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{name}"));
        e["valueFrom"]["secretKeyRef"].clone()
    };
    let vllm_key = ref_of(server, "VLLM_API_KEY");
    let serve_key = ref_of(container, "CONVOFLOW__LLM__API_KEY");
    assert_eq!((&vllm_key["name"], &vllm_key["key"]), (&serve_key["name"], &serve_key["key"]));
    assert!(vllm_key["name"].is_string());
    assert_eq!(ref_of(server, "HF_TOKEN")["optional"], true);
    // the HuggingFace cache on the claim of vllm-pvc.yaml
    let pvc = yaml("deploy/k8s/vllm-pvc.yaml");
    assert_eq!(pvc["kind"], "PersistentVolumeClaim");
    let cache = vllm_pod["volumes"].as_array().unwrap().iter().find(|v| v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]);
    let cache_mount = server["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == "/root/.cache/huggingface");
    assert_eq!(cache_mount.expect("the HF cache is mounted")["name"], cache.expect("the PVC is a volume")["name"]);
    assert_eq!(vllm["spec"]["strategy"]["type"], "Recreate", "one GPU, a ReadWriteOnce cache");
}
