//! The real Prometheus server scripts/test starts (scripts/prometheus: Debian's package, scraping
//! and evaluating every second): targets and rule files are written into its state dir
//! (`PROMETHEUS_STATE`), queries go through its HTTP API (`PROMETHEUS_URL`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Prometheus {
    pub url: String,
    state: PathBuf,
    agent: ureq::Agent,
}

/// One series of an instant query: its labels and value (NaN and ±Inf kept as they come).
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: serde_json::Map<String, Value>,
    pub value: f64,
}

/// An alert as `/api/v1/alerts` lists it.
#[derive(Debug, Clone)]
pub struct Alert {
    pub name: String,
    pub state: String,
    pub labels: serde_json::Map<String, Value>,
}

/// Which scrape job a target joins (the file patterns of scripts/prometheus).
#[derive(Debug, Clone, Copy)]
pub enum Job {
    /// `convoflow`: the workers.
    Worker,
    /// `convoflow-serve`: the API.
    Serve,
}

impl Prometheus {
    pub fn from_env() -> Self {
        let var = |v: &str| {
            std::env::var(v).unwrap_or_else(|_| panic!("{v} is not set: run the tests with scripts/test, which starts a real Prometheus (scripts/prometheus)"))
        };
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Self { url: var("PROMETHEUS_URL"), state: PathBuf::from(var("PROMETHEUS_STATE")), agent }
    }

    /// Scrapes `addr` (host:port of a `/metrics`) in `job` from now on, as target file `name`.
    pub fn add_target(&self, job: Job, name: &str, addr: &str) {
        self.add_target_labelled(job, name, addr, &[]);
    }

    /// `add_target` with target labels; a `job` label makes the target a deployment of its own
    /// (the rules aggregate by job: a test's ratio is then not diluted by other tests' workers).
    pub fn add_target_labelled(&self, job: Job, name: &str, addr: &str, labels: &[(&str, &str)]) {
        let file = self.target_file(job, name);
        let mut target_labels = serde_json::Map::new();
        target_labels.insert("test_target".into(), name.into());
        for (k, v) in labels {
            target_labels.insert(k.to_string(), v.to_string().into());
        }
        let body = serde_json::json!([{ "targets": [addr], "labels": target_labels }]);
        // written whole then renamed: file_sd never reads half a file
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, body.to_string()).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    }

    pub fn remove_target(&self, job: Job, name: &str) {
        let _ = std::fs::remove_file(self.target_file(job, name));
    }

    fn target_file(&self, job: Job, name: &str) -> PathBuf {
        let prefix = match job {
            Job::Worker => "worker",
            Job::Serve => "serve",
        };
        self.state.join("targets").join(format!("{prefix}-{name}.json"))
    }

    /// Installs `rules` (a rule file's text) as rule file `name` and reloads the server; returns
    /// once its rules API lists every alert of the file.
    pub fn install_rules(&self, name: &str, rules: &str) {
        let file = self.state.join("rules").join(format!("{name}.yml"));
        std::fs::write(&file, rules).unwrap();
        let expected: Vec<String> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).map(str::to_string).collect();
        let response = self.agent.post(format!("{}/-/reload", self.url)).send_empty().expect("POST /-/reload");
        assert_eq!(response.status().as_u16(), 200, "reloading Prometheus");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rules = self.api("/api/v1/rules", &[("type", "alert")]);
            let loaded: Vec<String> = rules["groups"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|g| g["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()))
                .collect();
            if expected.iter().all(|a| loaded.contains(a)) {
                return;
            }
            assert!(Instant::now() < deadline, "Prometheus did not load the rules of {name}: it lists {loaded:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `data` of a GET on the HTTP API (panics on an error answer, with Prometheus's reason).
    pub fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let mut request = self.agent.get(format!("{}{path}", self.url));
        for (k, v) in query {
            request = request.query(*k, *v);
        }
        let mut response = request.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let text = response.body_mut().read_to_string().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {text}"));
        assert_eq!(body["status"], "success", "GET {path} {query:?}: {body}");
        body["data"].clone()
    }

    /// An instant query's vector (a scalar answer comes back as one sample without labels).
    pub fn query(&self, expr: &str) -> Vec<Sample> {
        let data = self.api("/api/v1/query", &[("query", expr)]);
        let value = |v: &Value| v[1].as_str().unwrap().parse::<f64>().unwrap();
        match data["resultType"].as_str().unwrap() {
            "vector" => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Sample { labels: s["metric"].as_object().unwrap().clone(), value: value(&s["value"]) })
                .collect(),
            "scalar" => vec![Sample { labels: Default::default(), value: value(&data["result"]) }],
            other => panic!("{expr}: a {other} answer"),
        }
    }

    pub fn alerts(&self) -> Vec<Alert> {
        self.api("/api/v1/alerts", &[])["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| Alert {
                name: a["labels"]["alertname"].as_str().unwrap().to_string(),
                state: a["state"].as_str().unwrap().to_string(),
                labels: a["labels"].as_object().unwrap().clone(),
            })
            .collect()
    }

    /// Waits until alert `name` with labels `matching` is in `state` ("firing"), or, with
    /// `state` "inactive", until no such alert is listed; returns how long that took.
    pub fn wait_for_alert(&self, name: &str, matching: &[(&str, &str)], state: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let found: Vec<Alert> = self
                .alerts()
                .into_iter()
                .filter(|a| a.name == name && matching.iter().all(|(k, v)| a.labels.get(*k).and_then(Value::as_str) == Some(*v)))
                .collect();
            let reached = match state {
                "inactive" => found.is_empty(),
                s => found.iter().any(|a| a.state == s),
            };
            if reached {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{name} {matching:?} not {state} within {timeout:?}; alerts now: {:?}",
                self.alerts().iter().map(|a| (&a.name, &a.state, &a.labels)).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until the target `addr` of `job` has been scraped successfully (`up == 1`).
    pub fn wait_until_up(&self, addr: &str, timeout: Duration) {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.query(&format!("up{{instance=\"{addr}\"}}")).iter().any(|s| s.value == 1.0) {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("Prometheus did not scrape {addr} within {timeout:?}: {:?}", self.api("/api/v1/targets", &[]));
    }
}

/// The alert rules of `deploy/prometheus/alerts.yml` with every `for:` shortened to `for_s`
/// seconds and every range window (`[5m]`, `[10m]`, …) to `window_s` seconds, so that faults
/// fire them within a test's time.
pub fn shortened_rules(rules: &str, for_s: u32, window_s: u32) -> String {
    let mut out = String::with_capacity(rules.len());
    for line in rules.lines() {
        if let Some(i) = line.find("for: ") {
            out.push_str(&format!("{}for: {for_s}s\n", &line[..i]));
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            let close = rest[open..].find(']').map(|c| open + c);
            match close {
                Some(close) if close > open + 2 && rest[open + 1..close].ends_with('m') && rest[open + 1..close - 1].chars().all(|c| c.is_ascii_digit()) => {
                    out.push_str(&rest[..open]);
                    out.push_str(&format!("[{window_s}s]"));
                    rest = &rest[close + 1..];
                }
                _ => {
                    out.push_str(&rest[..=open]);
                    rest = &rest[open + 1..];
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}
