//! The dashboards and alerts on a real Prometheus (Debian's 2.42, started by scripts/test through
//! scripts/prometheus: scrapes and rule evaluations every second): the rule files pass promtool
//! and their unit tests, every dashboard query returns data once real workers, `convoflow serve`
//! and a real LLM server have run, faults injected into real processes make the alerts fire
//! (`/api/v1/alerts`) and resolve once cleared, and the worker's labels stay bounded.
//!
//! Alerts are fired with a copy of deploy/prometheus/alerts.yml whose `for:` and range windows
//! are shortened (`FOR_S`, `WINDOW_S`); the thresholds and expressions are the real ones.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::time::{Duration, Instant};

use common::prometheus::{Job, Prometheus, shortened_rules};
use common::serving::{LlmServer, MODEL, Serve, env_path};
use common::*;
use convoflow::sample::SampleGenerator;
use serde_json::{Value, json};
use yaml_rust2::{Yaml, YamlLoader};

/// `for:` of every rule in the test copy, seconds.
const FOR_S: u32 = 2;
/// Every range window (`[5m]`, `[10m]`, …) in the test copy, seconds.
const WINDOW_S: u32 = 10;
/// Longest wait for an alert to fire or resolve (its window, `for:`, the scrape and evaluation
/// intervals, and a slow 2-core machine running other tests).
const ALERT_TIMEOUT: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(text: &str) -> Yaml {
    YamlLoader::load_from_str(text).unwrap().remove(0)
}

/// `(alert name, rule)` of every alert rule of a rule file's groups.
fn alert_rules(groups: &Yaml) -> Vec<(String, Yaml)> {
    groups
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_vec().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(|a| (a.to_string(), r.clone())))
        .collect()
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool").args(args).current_dir(dir).output().expect("promtool (scripts/setup installs Debian's prometheus)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The shortened rules, installed once per test binary.
fn prometheus_with_test_rules() -> Prometheus {
    static RULES: Once = Once::new();
    let p = Prometheus::from_env();
    RULES.call_once(|| p.install_rules("convoflow-test", &shortened_rules(&read("deploy/prometheus/alerts.yml"), FOR_S, WINDOW_S)));
    p
}

/// The `/metrics` address a worker logged (`telemetry.listen` 127.0.0.1:0 picks the port).
fn metrics_addr(worker: &Worker) -> String {
    worker.wait_for_log("serving /metrics, /healthz, /readyz", Duration::from_secs(60));
    let log = worker.log_text();
    let line = log.lines().find(|l| l.contains("serving /metrics, /healthz, /readyz")).unwrap();
    line.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().to_string()
}

/// A worker scraped by Prometheus as target `name` (removed from the targets when dropped).
struct Scraped<'a> {
    worker: Worker,
    addr: String,
    name: String,
    prometheus: &'a Prometheus,
}

impl<'a> Scraped<'a> {
    fn start(prometheus: &'a Prometheus, name: &str, topics: &Topics, env: &[(&str, &str)]) -> Self {
        Self::start_labelled(prometheus, name, topics, env, &[])
    }

    fn start_labelled(prometheus: &'a Prometheus, name: &str, topics: &Topics, env: &[(&str, &str)], labels: &[(&str, &str)]) -> Self {
        let worker = Worker::start(name, topics, env);
        let addr = metrics_addr(&worker);
        let name = format!("{}-{name}", topics.input);
        prometheus.add_target_labelled(Job::Worker, &name, &addr, labels);
        prometheus.wait_until_up(&addr, Duration::from_secs(30));
        Self { worker, addr, name, prometheus }
    }

    /// Out of the targets, then SIGTERM and a clean exit.
    fn stop(mut self) {
        self.prometheus.remove_target(Job::Worker, &self.name);
        self.worker.signal("TERM");
        assert_eq!(self.worker.wait_exit(Duration::from_secs(30)).0, Some(0), "{}", self.worker.log_text());
    }
}

impl Drop for Scraped<'_> {
    fn drop(&mut self) {
        self.prometheus.remove_target(Job::Worker, &self.name);
    }
}

fn sum(samples: &[common::prometheus::Sample]) -> f64 {
    samples.iter().map(|s| s.value).sum()
}

#[test]
fn alert_rules_pass_promtool_their_unit_tests_and_say_the_same_in_kubernetes() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("observability-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["alerts.yml", "alerts.test.yml"] {
        std::fs::copy(root().join("deploy/prometheus").join(f), dir.join(f)).unwrap();
    }
    let rules_file = read("deploy/prometheus/alerts.yml");
    let rules = alert_rules(&yaml(&rules_file)["groups"]);
    assert!(rules.len() >= 20, "{} alerts", rules.len());
    println!("{}", promtool(&["check", "rules", "alerts.yml"], &dir).trim());
    // every alert's unit test fires it (and promtool fails on any alert it did not expect)
    println!("{}", promtool(&["test", "rules", "alerts.test.yml"], &dir).trim());
    let tests = yaml(&read("deploy/prometheus/alerts.test.yml"));
    let fired: BTreeSet<String> = tests["tests"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_vec().unwrap().iter())
        .filter(|c| c["exp_alerts"].as_vec().is_some_and(|a| !a.is_empty()))
        .map(|c| c["alertname"].as_str().unwrap().to_string())
        .collect();
    let silent: BTreeSet<String> = tests["tests"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_vec().unwrap().iter())
        .map(|c| c["alertname"].as_str().unwrap().to_string())
        .collect();
    // the deployed configuration loads the rules (without its Kubernetes jobs: Debian builds
    // Prometheus without the kubernetes_sd plugin)
    let config = yaml(&read("deploy/prometheus/prometheus.yml"));
    assert_eq!(config["rule_files"][0].as_str(), Some("alerts.yml"));
    let mut local = String::from("global:\n  scrape_interval: 15s\nrule_files:\n  - alerts.yml\nscrape_configs:\n");
    for job in config["scrape_configs"].as_vec().unwrap().iter().filter(|j| j["static_configs"].as_vec().is_some()) {
        let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
        local.push_str(&format!("  - job_name: {}\n    static_configs:\n      - targets: [\"{target}\"]\n", job["job_name"].as_str().unwrap()));
    }
    std::fs::write(dir.join("prometheus.yml"), local).unwrap();
    println!("{}", promtool(&["check", "config", "prometheus.yml"], &dir).trim());

    let runbook = read("docs/runbook.md");
    let anchors: BTreeSet<String> = runbook.lines().filter_map(|l| l.strip_prefix("## ")).map(|h| h.trim().to_lowercase()).collect();
    for (name, rule) in &rules {
        let a = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(a[key].as_str().is_some_and(|s| !s.is_empty()), "{name}: annotation {key}");
        }
        let url = a["runbook_url"].as_str().unwrap();
        assert_eq!(url, format!("docs/runbook.md#{}", name.to_lowercase()), "{name}: runbook_url");
        assert!(anchors.contains(&name.to_lowercase()), "docs/runbook.md has no section ## {name}");
        assert!(runbook.contains(&format!("| {name}")), "docs/runbook.md's threshold table names {name}");
        assert!(matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")), "{name}: severity");
        assert!(fired.contains(name), "alerts.test.yml has no case where {name} fires");
        assert!(silent.contains(name), "alerts.test.yml never evaluates {name}");
    }

    // the PrometheusRule: the same groups and rules, plus ConvoflowRestarting
    let manifest = yaml(&read("deploy/k8s/prometheus-rule.yaml"));
    assert_eq!(manifest["kind"].as_str(), Some("PrometheusRule"));
    let k8s = alert_rules(&manifest["spec"]["groups"]);
    let k8s_map: BTreeMap<&str, &Yaml> = k8s.iter().map(|(n, r)| (n.as_str(), r)).collect();
    for (name, rule) in &rules {
        assert_eq!(k8s_map.get(name.as_str()), Some(&rule), "deploy/k8s/prometheus-rule.yaml: {name} differs from alerts.yml");
    }
    let extra: Vec<&str> = k8s_map.keys().copied().filter(|n| !rules.iter().any(|(r, _)| r == n)).collect();
    assert_eq!(extra, ["ConvoflowRestarting"]);
    let restarting = k8s_map["ConvoflowRestarting"];
    assert!(restarting["expr"].as_str().unwrap().contains("kube_pod_container_status_restarts_total{container=\"convoflow\"}"));
    assert!(anchors.contains("convoflowrestarting"));
    // promtool on the manifest's groups, and its restart alert's own unit test
    let mut groups_file = String::new();
    yaml_rust2::YamlEmitter::new(&mut groups_file)
        .dump(&Yaml::Hash([(Yaml::String("groups".into()), manifest["spec"]["groups"].clone())].into_iter().collect()))
        .unwrap();
    std::fs::write(dir.join("k8s-rules.yml"), groups_file).unwrap();
    println!("{}", promtool(&["check", "rules", "k8s-rules.yml"], &dir).trim());
    std::fs::write(
        dir.join("k8s.test.yml"),
        r#"rule_files: [k8s-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'kube_pod_container_status_restarts_total{namespace="nlp",pod="convoflow-0",container="convoflow"}'
        values: '0 0 0 1 1 1 1 1 1 1'
      - series: 'kube_pod_container_status_restarts_total{namespace="nlp",pod="other-0",container="other"}'
        values: '0 1 2 3 4 5 6 7 8 9'
    alert_rule_test:
      - eval_time: 2m
        alertname: ConvoflowRestarting
        exp_alerts: []
      - eval_time: 5m
        alertname: ConvoflowRestarting
        exp_alerts:
          - exp_labels: {severity: critical, namespace: nlp, pod: convoflow-0, container: convoflow}
            exp_annotations:
              summary: "convoflow pod nlp/convoflow-0 restarted"
              description: "The convoflow container of nlp/convoflow-0 restarted 1 times in 15 minutes: see its previous log (kubectl logs --previous) for the exit reason."
              runbook_url: "docs/runbook.md#convoflowrestarting"
"#,
    )
    .unwrap();
    println!("{}", promtool(&["test", "rules", "k8s.test.yml"], &dir).trim());

    // the test copy is shortened where it must be, and nowhere else
    let short = shortened_rules(&rules_file, FOR_S, WINDOW_S);
    assert!(!short.contains("[5m]") && !short.contains("for: 5m") && short.contains(&format!("[{WINDOW_S}s]")));
    assert_eq!(alert_rules(&yaml(&short)["groups"]).len(), rules.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_metric_is_documented_and_on_the_dashboard_or_said_why_not() {
    let metrics_doc = read("docs/metrics.md");
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/convoflow.json")).unwrap();
    let exprs: Vec<String> = dashboard_queries(&dashboard).into_iter().map(|q| q.expr).collect();
    let off = metrics_doc.split("## Not on the dashboard").nth(1).expect("docs/metrics.md: a section ## Not on the dashboard");
    for name in convoflow::telemetry::ALL {
        assert!(metrics_doc.contains(&format!("`{name}`")), "docs/metrics.md does not document {name}");
        let shown = exprs.iter().any(|e| e.contains(name));
        let said = off.lines().any(|l| l.starts_with(&format!("| `{name}`")));
        assert!(shown || said, "{name} is neither on the dashboard nor under 'Not on the dashboard' in docs/metrics.md");
        assert!(!(shown && said), "{name} is on the dashboard and listed as not on it");
    }
}

/// A dashboard query: its panel and expression.
#[derive(Debug, Clone)]
struct Query {
    panel: String,
    expr: String,
}

fn dashboard_queries(dashboard: &Value) -> Vec<Query> {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().unwrap().iter().map(|t| Query {
                panel: p["title"].as_str().unwrap().to_string(),
                expr: t["expr"].as_str().unwrap().to_string(),
            })
        })
        .collect()
}

/// Why a query is not evaluated in the worker run (None: it is).
fn not_in_worker_run(expr: &str) -> Option<&'static str> {
    if expr.contains("convoflow_gpu_") || expr.contains("convoflow_torch_") {
        Some("needs NVML and a CUDA device (absent on this machine)")
    } else if expr.contains("convoflow_api_") || expr.contains("convoflow_llm_") {
        Some("convoflow serve's: evaluated in the serve run")
    } else {
        None
    }
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Parses the Prometheus text format into `metric → label → distinct values`, and the series
/// count per metric.
fn label_values(text: &str) -> (BTreeMap<String, BTreeMap<String, BTreeSet<String>>>, BTreeMap<String, usize>) {
    let mut values: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut series: BTreeMap<String, usize> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (name, labels) = match line.find('{') {
            Some(i) => (&line[..i], &line[i + 1..line.rfind('}').unwrap()]),
            None => (line.split_whitespace().next().unwrap(), ""),
        };
        let base = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n)).to_string();
        *series.entry(base.clone()).or_default() += 1;
        // label="value" pairs; values are escaped (\" \\ \n), never contain an unescaped quote
        let mut rest = labels;
        while let Some(eq) = rest.find("=\"") {
            let key = rest[..eq].trim_start_matches(',').trim().to_string();
            let after = &rest[eq + 2..];
            let mut end = 0;
            let bytes = after.as_bytes();
            while end < bytes.len() && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\')) {
                end += 1;
            }
            values.entry(base.clone()).or_default().entry(key).or_default().insert(after[..end].to_string());
            rest = &after[(end + 1).min(after.len())..];
        }
    }
    (values, series)
}

/// A healthy run with the three models on the CPU (at-least-once) and a model-free worker with
/// exactly-once output, scraped by Prometheus: every dashboard query that a worker answers
/// returns a series, the worker's labels are bounded and hold no ids or text; then
/// `convoflow serve` on the models worker's store with a real LLM server: every API and LLM
/// query returns a series; then the LLM server is killed (asks fail: ConvoflowApiErrors and
/// ConvoflowLlmErrors fire) and restarted on its port (both resolve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_and_serve_alerts_fire_and_resolve() {
    let prometheus = prometheus_with_test_rules();
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/convoflow.json")).unwrap();
    let queries = dashboard_queries(&dashboard);

    let models_topics = Topics::new("obs-models");
    let eos_topics = Topics::new("obs-eos");
    create_topic(&models_topics.input, 2).await;
    create_topic(&eos_topics.input, 2).await;
    let g = SampleGenerator::new(71);
    let models_events: Vec<_> = (0..24).flat_map(|n| g.conversation_events(n)).collect();
    let eos_events: Vec<_> = (100..160).flat_map(|n| g.conversation_events(n)).collect();
    let ids: BTreeSet<String> = models_events.iter().chain(&eos_events).map(|e| e.conversation_id.clone()).collect();
    let env = cpu_models_env(&[("CONVOFLOW__PIPELINE__MAX_BATCH_MESSAGES", "8")]);
    let models = Scraped::start(&prometheus, "models", &models_topics, &refs(&env));
    let eos = Scraped::start(
        &prometheus,
        "eos",
        &eos_topics,
        &[("CONVOFLOW__KAFKA__DELIVERY", "exactly_once"), ("CONVOFLOW__KAFKA__INSTANCE_ID", "obs-eos")],
    );
    produce_conversations(&models_topics.input, &models_events).await;
    produce_conversations(&eos_topics.input, &eos_events).await;
    wait_for_distinct_sources(&models_topics.output, models_events.len(), Duration::from_secs(240));
    wait_for_distinct_sources(&eos_topics.output, eos_events.len(), Duration::from_secs(120));
    wait_for_lag_zero(&models_topics, Duration::from_secs(60)).await;
    std::thread::sleep(Duration::from_secs(4)); // a few more scrapes: every rate has two samples after the last event

    let mut evaluated = 0;
    let mut skipped = Vec::new();
    let mut empty = Vec::new();
    for q in &queries {
        if let Some(why) = not_in_worker_run(&q.expr) {
            skipped.push((q, why));
            continue;
        }
        evaluated += 1;
        if prometheus.query(&q.expr).is_empty() {
            empty.push(q);
        }
    }
    assert!(empty.is_empty(), "dashboard queries returning no series after a worker run:\n{empty:#?}");

    // labels: bounded, and never a conversation id or a turn's text
    let (_, body) = http_get(models.addr.rsplit(':').next().unwrap().parse().unwrap(), "/metrics").expect("GET /metrics");
    let (values, series) = label_values(&body);
    for (metric, labels) in &values {
        for (label, vals) in labels {
            let bound = match label.as_str() {
                "le" => 32,
                "partition" => 2,
                _ => 16,
            };
            assert!(vals.len() <= bound, "{metric}{{{label}}} has {} values (at most {bound}): {vals:?}", vals.len());
            for v in vals {
                assert!(!ids.contains(v), "{metric}{{{label}}} holds a conversation id: {v}");
                assert!(v.len() <= 64, "{metric}{{{label}}} holds a long value: {v}");
            }
        }
    }
    let total: usize = series.values().sum();
    assert!(total < 1500, "{total} series exported by one worker");
    println!("labels: {} metrics, {total} series, at most {} values per label (le aside)",
        series.len(),
        values.values().flat_map(|l| l.iter().filter(|(k, _)| *k != "le").map(|(_, v)| v.len())).max().unwrap_or(0));
    eos.stop();
    let store_dir = store_dir(&models_topics.group, "models");
    models.stop();

    // convoflow serve on the models worker's store, with a real LLM server
    let llm = LlmServer::start(2048, 2);
    let serve_env: Vec<(String, String)> = [
        ("CONVOFLOW__QDRANT__DATA_DIR", store_dir.display().to_string()),
        ("CONVOFLOW__QDRANT__DENSE_DIM", "384".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__NAME", "sentence-transformers/all-MiniLM-L6-v2".into()),
        ("CONVOFLOW__MODELS__EMBEDDING__PATH", env_path("CONVOFLOW_MINILM").display().to_string()),
        ("CONVOFLOW__GPU__DEVICE", "cpu".into()),
        ("CONVOFLOW__LLM__URL", llm.url.clone()),
        ("CONVOFLOW__LLM__MODEL", MODEL.into()),
        ("CONVOFLOW__LLM__MAX_TOKENS", "16".into()),
        ("CONVOFLOW__LLM__CONTEXT_TOKENS", "1024".into()),
        ("CONVOFLOW__LLM__TIMEOUT_MS", "20000".into()),
        ("CONVOFLOW__LLM__TOKENIZER", env_path("CONVOFLOW_LLM_TOKENIZER").display().to_string()),
        ("CONVOFLOW_LOG", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let serve = Serve::start(&serve_env);
    let serve_addr = serve.base.trim_start_matches("http://").trim_end_matches('/').to_string();
    let target = format!("serve-{}", std::process::id());
    prometheus.add_target(Job::Serve, &target, &serve_addr);
    prometheus.wait_until_up(&serve_addr, Duration::from_secs(30));
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(60))).build().into();
    let post = |path: &str, body: &Value| -> u16 {
        let mut r = agent.post(format!("{}{path}", serve.base)).header("Content-Type", "application/json").send(body.to_string()).unwrap();
        let _ = r.body_mut().read_to_string();
        r.status().as_u16()
    };
    for i in 0..4 {
        assert_eq!(post("/v1/search", &json!({"query": format!("refund for order {i}"), "k": 3})), 200);
    }
    for _ in 0..2 {
        assert_eq!(post("/v1/ask", &json!({"question": "Where is my parcel?", "k": 2})), 200);
    }
    std::thread::sleep(Duration::from_secs(4));
    let mut serve_empty = Vec::new();
    for q in &queries {
        if q.expr.contains("convoflow_api_") || q.expr.contains("convoflow_llm_") {
            evaluated += 1;
            skipped.retain(|(s, _)| s.expr != q.expr);
            if prometheus.query(&q.expr).is_empty() {
                serve_empty.push(q);
            }
        }
    }
    assert!(serve_empty.is_empty(), "dashboard queries returning no series after the serve run:\n{serve_empty:#?}");
    println!("dashboard: {} queries, {evaluated} evaluated and returning data, {} skipped:", queries.len(), skipped.len());
    for (q, why) in &skipped {
        println!("  skipped [{}] {} — {why}", q.panel, q.expr);
    }

    // the LLM server goes away: asks fail (503), searches still answer
    let mut llm = llm;
    let port = llm.port;
    llm.kill();
    let faulted = Instant::now();
    let mut api_fired = None;
    let mut llm_fired = None;
    while api_fired.is_none() || llm_fired.is_none() {
        assert!(faulted.elapsed() < ALERT_TIMEOUT, "serve alerts did not fire: {:?}", prometheus.alerts());
        let status = post("/v1/ask", &json!({"question": "Where is my parcel?", "k": 2}));
        assert!(status >= 500, "an ask without its LLM answered {status}");
        assert_eq!(post("/v1/search", &json!({"query": "parcel", "k": 2})), 200);
        let firing = prometheus.alerts();
        let is_firing = |name: &str| firing.iter().any(|a| a.name == name && a.state == "firing" && a.labels.get("instance").and_then(Value::as_str) == Some(serve_addr.as_str()));
        if api_fired.is_none() && is_firing("ConvoflowApiErrors") {
            api_fired = Some(faulted.elapsed());
        }
        if llm_fired.is_none() && is_firing("ConvoflowLlmErrors") {
            llm_fired = Some(faulted.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // back on its port: asks answer again and both alerts resolve
    let llm = LlmServer::start_on(port, 2048, 2);
    let cleared = Instant::now();
    let mut resolved = BTreeMap::new();
    while resolved.len() < 2 {
        assert!(cleared.elapsed() < ALERT_TIMEOUT, "serve alerts did not resolve: {:?}", prometheus.alerts());
        assert_eq!(post("/v1/ask", &json!({"question": "Where is my parcel?", "k": 2})), 200);
        let alerts = prometheus.alerts();
        for name in ["ConvoflowApiErrors", "ConvoflowLlmErrors"] {
            if !alerts.iter().any(|a| a.name == name && a.labels.get("instance").and_then(Value::as_str) == Some(serve_addr.as_str())) {
                resolved.entry(name).or_insert(cleared.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    println!(
        "serve: LLM server killed → ConvoflowApiErrors firing after {:.1} s, ConvoflowLlmErrors after {:.1} s; restarted → resolved after {:.1} s / {:.1} s",
        api_fired.unwrap().as_secs_f64(),
        llm_fired.unwrap().as_secs_f64(),
        resolved["ConvoflowApiErrors"].as_secs_f64(),
        resolved["ConvoflowLlmErrors"].as_secs_f64()
    );
    prometheus.remove_target(Job::Serve, &target);
    drop(serve);
    drop(llm);
}

/// A poison burst (a third of the input undecodable, until the alert fires) fires
/// ConvoflowDeadLetterRate for its class; good input alone afterwards resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_burst_fires_the_dead_letter_alert_which_resolves_once_it_ends() {
    let prometheus = prometheus_with_test_rules();
    let topics = Topics::new("obs-poison");
    create_topic(&topics.input, 2).await;
    // a deployment of its own (job label): the DLQ share is of this worker's input alone
    let worker = Scraped::start_labelled(&prometheus, "w", &topics, &[], &[("job", "convoflow-poison-test")]);
    let g = SampleGenerator::new(72);
    let mut n = 0;
    let faulted = Instant::now();
    let mut fired = None;
    while fired.is_none() {
        assert!(faulted.elapsed() < ALERT_TIMEOUT, "ConvoflowDeadLetterRate did not fire: {:?}", prometheus.alerts());
        // 10 good conversations and 5 poison records, about once a second (the rule also asks
        // for more than 10 dead-lettered in its window)
        let good: Vec<_> = (n..n + 10).flat_map(|i| g.conversation_events(i)).collect();
        n += 10;
        produce_conversations(&topics.input, &good).await;
        let poison: Vec<_> = (0..5).map(|i| (Some(format!("poison-{n}-{i}").into_bytes()), Some(b"{ not json".to_vec()))).collect();
        produce_raw(&topics.input, &poison).await;
        if prometheus.alerts().iter().any(|a| a.name == "ConvoflowDeadLetterRate" && a.state == "firing" && a.labels.get("class").and_then(Value::as_str) == Some("deserialization")) {
            fired = Some(faulted.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cleared = Instant::now();
    let mut resolved = None;
    while resolved.is_none() {
        assert!(cleared.elapsed() < ALERT_TIMEOUT, "ConvoflowDeadLetterRate did not resolve: {:?}", prometheus.alerts());
        let good: Vec<_> = (n..n + 2).flat_map(|i| g.conversation_events(i)).collect();
        n += 2;
        produce_conversations(&topics.input, &good).await;
        if !prometheus.alerts().iter().any(|a| a.name == "ConvoflowDeadLetterRate" && a.labels.get("class").and_then(Value::as_str) == Some("deserialization")) {
            resolved = Some(cleared.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dlq = sum(&prometheus.query(&format!("convoflow_dlq_messages_total{{class=\"deserialization\",instance=\"{}\"}}", worker.addr)));
    assert!(dlq >= 10.0, "{dlq} dead-lettered");
    println!(
        "poison burst: ConvoflowDeadLetterRate firing after {:.1} s, resolved {:.1} s after the burst ended ({dlq} poison records dead-lettered)",
        fired.unwrap().as_secs_f64(),
        resolved.unwrap().as_secs_f64()
    );
    worker.stop();
}

/// The embedded store's disk below its reserve: the reserve (`qdrant.edge_min_free_bytes`) is set
/// 100 MB below what is free, then a 256 MB ballast file is written beside the store: writes
/// wait (ConvoflowDiskBelowReserve and ConvoflowStoreFailing fire, `/readyz` 503); the ballast
/// deleted, the writes resume and both resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_disk_below_its_reserve_fires_the_store_alerts_which_resolve_once_space_returns() {
    let prometheus = prometheus_with_test_rules();
    let topics = Topics::new("obs-disk");
    create_topic(&topics.input, 2).await;
    let store = store_dir(&topics.group, "w");
    std::fs::create_dir_all(&store).unwrap();
    let free = convoflow::sink::store::edge::free_bytes(&store).unwrap();
    assert!(free > 1_000_000_000, "{free} bytes free: too little room for this test");
    let reserve = (free - 100_000_000).to_string();
    let worker = Scraped::start(&prometheus, "w", &topics, &[("CONVOFLOW__QDRANT__EDGE_MIN_FREE_BYTES", reserve.as_str())]);
    let g = SampleGenerator::new(73);
    produce_conversations(&topics.input, &(0..10).flat_map(|n| g.conversation_events(n)).collect::<Vec<_>>()).await;
    wait_for_distinct_sources(&topics.output, 10, Duration::from_secs(60));
    // the fault: 256 MB written beside the store, its filesystem now below the reserve
    let ballast = store.parent().unwrap().join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).unwrap();
        let block = vec![1u8; 1 << 20];
        for _ in 0..256 {
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    produce_conversations(&topics.input, &(10..20).flat_map(|n| g.conversation_events(n)).collect::<Vec<_>>()).await;
    let instance = [("instance", worker.addr.as_str())];
    let disk = prometheus.wait_for_alert("ConvoflowDiskBelowReserve", &instance, "firing", ALERT_TIMEOUT);
    let failing = disk + prometheus.wait_for_alert("ConvoflowStoreFailing", &instance, "firing", ALERT_TIMEOUT);
    assert!(worker.worker.log_text().contains("below qdrant.edge_min_free_bytes"), "{}", worker.worker.log_text());
    let (status, body) = http_get(worker.addr.rsplit(':').next().unwrap().parse().unwrap(), "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");
    std::fs::remove_file(&ballast).unwrap();
    wait_for_distinct_sources(&topics.output, 20, Duration::from_secs(60));
    let disk_ok = prometheus.wait_for_alert("ConvoflowDiskBelowReserve", &instance, "inactive", ALERT_TIMEOUT);
    let store_ok = disk_ok + prometheus.wait_for_alert("ConvoflowStoreFailing", &instance, "inactive", ALERT_TIMEOUT);
    println!(
        "store disk below its reserve: ConvoflowDiskBelowReserve firing after {:.1} s, ConvoflowStoreFailing after {:.1} s; \
         space back → resolved after {:.1} s / {:.1} s",
        disk.as_secs_f64(),
        failing.as_secs_f64(),
        disk_ok.as_secs_f64(),
        store_ok.as_secs_f64()
    );
    worker.stop();
}

/// Two workers share a topic; one is frozen (SIGSTOP) with a backlog on its partitions:
/// ConvoflowWorkerDown fires for it and ConvoflowPartitionStalled for its partitions (the other
/// worker reports their lag); thawed (SIGCONT), it catches up and both resolve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_fires_worker_down_and_partition_stalled_which_resolve_once_it_thaws() {
    let prometheus = prometheus_with_test_rules();
    let topics = Topics::new("obs-freeze");
    create_topic(&topics.input, 4).await;
    // a session timeout far above the test: the frozen member keeps its partitions
    let env = [("CONVOFLOW__KAFKA__SESSION_TIMEOUT_MS", "120000")];
    let a = Scraped::start(&prometheus, "a", &topics, &env);
    let b = Scraped::start(&prometheus, "b", &topics, &env);
    let g = SampleGenerator::new(74);
    produce_conversations(&topics.input, &(0..20).flat_map(|n| g.conversation_events(n)).collect::<Vec<_>>()).await;
    wait_for_distinct_sources(&topics.output, 20, Duration::from_secs(60));
    wait_until("both workers hold partitions", Duration::from_secs(60), {
        let (a, b) = (a.addr.clone(), b.addr.clone());
        move || {
            let p = Prometheus::from_env();
            [a.as_str(), b.as_str()].iter().all(|addr| sum(&p.query(&format!("convoflow_assigned_partitions{{instance=\"{addr}\"}}"))) >= 1.0)
        }
    })
    .await;
    let frozen_partitions: BTreeSet<String> = a.worker.assignments().last().unwrap().iter().map(|p| p.to_string()).collect();
    a.worker.signal("STOP");
    produce_conversations(&topics.input, &(20..60).flat_map(|n| g.conversation_events(n)).collect::<Vec<_>>()).await;
    let down = prometheus.wait_for_alert("ConvoflowWorkerDown", &[("instance", a.addr.as_str())], "firing", ALERT_TIMEOUT);
    let partition = frozen_partitions.iter().next().unwrap().clone();
    let stalled = down
        + prometheus.wait_for_alert(
            "ConvoflowPartitionStalled",
            &[("topic", topics.input.as_str()), ("partition", partition.as_str())],
            "firing",
            ALERT_TIMEOUT,
        );
    // b's partitions are not stalled
    let b_partitions: BTreeSet<String> = b.worker.assignments().last().unwrap().iter().map(|p| p.to_string()).collect();
    let stalled_now: BTreeSet<String> = prometheus
        .alerts()
        .into_iter()
        .filter(|x| x.name == "ConvoflowPartitionStalled" && x.labels.get("topic").and_then(Value::as_str) == Some(topics.input.as_str()))
        .filter_map(|x| x.labels.get("partition").and_then(Value::as_str).map(str::to_string))
        .collect();
    assert!(stalled_now.is_disjoint(&b_partitions), "stalled {stalled_now:?}, b holds {b_partitions:?}");
    a.worker.signal("CONT");
    let up = prometheus.wait_for_alert("ConvoflowWorkerDown", &[("instance", a.addr.as_str())], "inactive", ALERT_TIMEOUT);
    let moving = up + prometheus.wait_for_alert("ConvoflowPartitionStalled", &[("topic", topics.input.as_str())], "inactive", ALERT_TIMEOUT);
    wait_for_distinct_sources(&topics.output, 60, Duration::from_secs(60));
    println!(
        "worker frozen with a backlog: ConvoflowWorkerDown firing after {:.1} s, ConvoflowPartitionStalled after {:.1} s; \
         thawed → resolved after {:.1} s / {:.1} s",
        down.as_secs_f64(),
        stalled.as_secs_f64(),
        up.as_secs_f64(),
        moving.as_secs_f64()
    );
    a.stop();
    b.stop();
}
